"""Our train step against HF transformers + PyTorch at the same shapes, each step in a fresh process per round,
and against the machine's float32 matmul peak:

  ours     this project's compiled train step (the trainer's own, through bench/common.py) on one CPU device,
           XLA spreading each operation over the cores (train.py's default)
  stacked  the same model with its blocks stacked and unrolled (model.scan_layers, model.scan_unroll = depth):
           the same computation with a seventh of the parameter arrays (60 instead of 412 at S/16)
  per_core the same step on one CPU device per core, data-parallel (mesh.cpu_devices_per_core, which the small
           CPU recipes set; runtime.distributed.cpu_devices_per_core); not run unless named in --implementations
  pytorch  HF transformers' SiglipModel (its own sigmoid loss, return_loss=True) + torch.optim.AdamW
  peak     a large float32 matmul in JAX: the most FLOP/s this machine gives a program like ours

    python bench/compare_step.py [--rounds 2] [--steps 3] [--batch 32] [--variant S/16] [--image-size 128]
                                 [--depth N]   (N blocks per tower instead of the variant's: dry runs)
                                 [--implementations ours,stacked,pytorch,peak]

Every round starts one process per implementation, in an order rotated each round, so no implementation
inherits another's thread pools, caches or heap, and none always runs right after the same other. Each
process builds its step, runs two untimed steps, then times `--steps` steps. The load average (1 min) is read
before each process starts and printed beside its time: a figure is quiet when that load is under 1.5 (on 2
cores, a load of 2 already means another job shares the CPU). Per round: ours / pytorch, and ours's FLOP/s
(FLOPs of its compiled step from XLA's cost analysis over its step time) as a share of the peak measured in
the same round, the same for the other JAX steps, and each process's whole time (build and compile included);
then the medians over rounds.

Defaults are issue 31's shapes at full depth: S/16 image and S text towers (12 blocks each), 128 px, 32
tokens, vocabulary 32k, batch 32, AdamW, float32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import common  # noqa: F401  (puts the repo on the path)

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
LAYER_NORM_EPSILON = 1e-6
IMPLEMENTATIONS = ("ours", "stacked", "per_core", "pytorch", "peak")
DEFAULT_IMPLEMENTATIONS = "ours,stacked,pytorch,peak"
JAX_STEPS = ("ours", "stacked", "per_core")
QUIET_LOAD = 1.5
PEAK_MATMUL_SIZE = 2048


def _time_steps(step, steps: int) -> tuple[float, list[float]]:
    """(seconds per step over `steps` timed steps, the two untimed warm-up losses)."""
    warmup = [step(), step()]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, warmup


def run_ours(args: argparse.Namespace, per_core: bool = False, stacked: bool = False) -> dict:
    from siglip_jax.runtime import distributed

    devices = distributed.cpu_devices_per_core((args.batch,), (-1, 1, 1)) if per_core else 1
    common.simulate_cpu_devices(devices)
    import jax

    from siglip_jax.config import default_config

    config = default_config()
    config.model.image.variant = args.variant
    config.model.text.variant = args.variant.split("/")[0]
    config.model.image.image_size = args.image_size
    config.model.text.max_len = args.tokens
    config.model.text.vocab_size = args.vocab
    config.model.dtype = "float32"
    config.data.batch_size = args.batch
    config.model.image.depth = config.model.text.depth = args.depth
    if stacked:
        config.model.scan_layers = True
        config.model.scan_unroll = args.depth or 1_000  # past the depth: every block unrolled
    config.optim.learning_rate = LEARNING_RATE
    config.optim.schedule, config.optim.warmup_steps = "constant", 0
    compiled, state, batch, _ = common.compiled_train_step(config, mesh_shape=(devices, 1, 1))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # one device's share of the partitioned step
    holder = [state]

    def step() -> float:
        holder[0], metrics = compiled(holder[0], batch)
        return float(metrics["loss"])

    seconds, warmup = _time_steps(step, args.steps)
    return {"seconds_per_step": seconds, "flops_per_step": devices * float(cost.get("flops", 0.0)),
            "warmup_losses": warmup, "devices": devices,
            "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(holder[0].params))),
            "device": jax.devices()[0].device_kind}


def run_pytorch(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from transformers import SiglipConfig, SiglipModel

    from siglip_jax.models import sizes

    size, patch = sizes.parse_variant(args.variant)
    depth = args.depth or size.depth
    torch.manual_seed(0)
    shared = dict(hidden_size=size.width, intermediate_size=size.mlp_dim, num_hidden_layers=depth,
                  num_attention_heads=size.num_heads, layer_norm_eps=LAYER_NORM_EPSILON)
    model_config = SiglipConfig(
        vision_config=dict(image_size=args.image_size, patch_size=patch, **shared),
        text_config=dict(vocab_size=args.vocab, max_position_embeddings=args.tokens, **shared),
    )
    model = SiglipModel(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (args.batch, 3, args.image_size, args.image_size)).astype(np.float32))
    tokens = torch.from_numpy(rng.integers(3, args.vocab, (args.batch, args.tokens)))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        optimizer.step()
        return float(loss)

    seconds, warmup = _time_steps(step, args.steps)
    return {"seconds_per_step": seconds, "warmup_losses": warmup, "threads": torch.get_num_threads(),
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def run_peak(args: argparse.Namespace) -> dict:
    """float32 FLOP/s of a [n, n] x [n, n] matmul chain in JAX: the ceiling for matmul-bound programs."""
    import jax
    import jax.numpy as jnp

    n = PEAK_MATMUL_SIZE
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n**0.5
    matmul = jax.jit(lambda x: x @ b)
    holder = [a]

    def step() -> float:
        holder[0] = matmul(holder[0]).block_until_ready()
        return 0.0

    seconds, _ = _time_steps(step, max(args.steps, 5))
    return {"seconds_per_step": seconds, "flops_per_second": 2 * n**3 / seconds}


WORKERS = {"ours": run_ours, "stacked": lambda args: run_ours(args, stacked=True),
           "per_core": lambda args: run_ours(args, per_core=True), "pytorch": run_pytorch, "peak": run_peak}


def _worker_command(args: argparse.Namespace, name: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", name, "--variant", args.variant,
            "--image-size", str(args.image_size), "--tokens", str(args.tokens), "--vocab", str(args.vocab),
            "--batch", str(args.batch), "--steps", str(args.steps), "--depth", str(args.depth)]


def _run_worker(args: argparse.Namespace, name: str) -> dict:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.run(_worker_command(args, name), capture_output=True, text=True, timeout=args.timeout)
    if process.returncode:
        raise SystemExit(f"The {name} step failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    return {**result, "load_before": load, "process_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="S/16", help="image tower; the text tower is the same size")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    parser.add_argument("--depth", type=int, default=0, help="blocks per tower (0: the variant's, 12 for S); dry runs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one process may take")
    parser.add_argument("--implementations", default=DEFAULT_IMPLEMENTATIONS,
                        help=f"comma-separated, from {', '.join(IMPLEMENTATIONS)} (pytorch and peak are required)")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one implementation, in this fresh process: a JSON line for the parent
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    names = tuple(name.strip() for name in args.implementations.split(",") if name.strip())
    unknown = sorted(set(names) - set(IMPLEMENTATIONS))
    if unknown or "pytorch" not in names or "peak" not in names or not set(names) & set(JAX_STEPS):
        raise SystemExit(f"--implementations {args.implementations!r}: name pytorch, peak and at least one of "
                         f"{', '.join(JAX_STEPS)}, from {', '.join(IMPLEMENTATIONS)}" + (f"; unknown: {unknown}" if unknown else ""))
    jax_steps = [name for name in names if name in JAX_STEPS]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(_run_worker(args, name))
        pytorch, peak = results["pytorch"][-1], results["peak"][-1]
        parts = [f"{name} {results[name][-1]['seconds_per_step']:.3f} s (load {results[name][-1]['load_before']:.2f}, "
                 f"process {results[name][-1]['process_seconds']:.0f} s)" for name in jax_steps]
        print(f"round {round_index + 1}: " + ", ".join(parts) + f", pytorch {pytorch['seconds_per_step']:.3f} s (load "
              f"{pytorch['load_before']:.2f}), peak {peak['flops_per_second'] / 1e9:.1f} GFLOP/s (load "
              f"{peak['load_before']:.2f}); " + ", ".join(
                  f"{name} / pytorch {results[name][-1]['seconds_per_step'] / pytorch['seconds_per_step']:.2f}x at "
                  f"{_share(results[name][-1], peak):.0%} of peak" for name in jax_steps), flush=True)

    loads = [result["load_before"] for name in names for result in results[name]]
    first = results[jax_steps[0]][0]
    print(f"\n{args.variant} image + {args.variant.split('/')[0]} text ({args.depth or 'all'} blocks each), "
          f"{args.image_size} px, {args.tokens} tokens, vocab {args.vocab}, batch {args.batch}, float32 on "
          f"{first['device']}, {os.cpu_count()} CPUs; parameters: ours {first['parameters']:,}, pytorch "
          f"{results['pytorch'][0]['parameters']:,} ({results['pytorch'][0]['threads']} torch threads); "
          f"{first['flops_per_step']:.3e} FLOPs a step (XLA cost analysis); load before each process "
          f"{min(loads):.2f}-{max(loads):.2f}" + ("" if max(loads) < QUIET_LOAD else
                                                  f" (not quiet: over {QUIET_LOAD} before some processes)"))
    print("| round | " + " | ".join(f"{name} s/step | {name} / pytorch | {name} share of peak | {name} process s"
                                     for name in jax_steps) + " | pytorch s/step | peak GFLOP/s |")
    print("| --- |" + " ---: |" * (4 * len(jax_steps) + 2))
    rows = []
    for index in range(args.rounds):
        pytorch, peak = results["pytorch"][index], results["peak"][index]
        row = []
        for name in jax_steps:
            result = results[name][index]
            row += [result["seconds_per_step"], result["seconds_per_step"] / pytorch["seconds_per_step"],
                    _share(result, peak), result["process_seconds"]]
        rows.append(row + [pytorch["seconds_per_step"], peak["flops_per_second"] / 1e9])
    formats = ["{:.3f}", "{:.2f}x", "{:.0%}", "{:.0f}"] * len(jax_steps) + ["{:.3f}", "{:.1f}"]
    for label, row in [*((str(i + 1), row) for i, row in enumerate(rows)),
                       ("median", [statistics.median(column) for column in zip(*rows)])]:
        print(f"| {label} | " + " | ".join(form.format(value) for form, value in zip(formats, row)) + " |")


def _share(result: dict, peak: dict) -> float:
    """A JAX step's FLOP/s (XLA's cost analysis over its step time) as a share of the round's matmul peak."""
    return result["flops_per_step"] / result["seconds_per_step"] / peak["flops_per_second"]


if __name__ == "__main__":
    main()
