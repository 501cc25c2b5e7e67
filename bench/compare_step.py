"""Our train step against HF transformers + PyTorch at the same shapes, each step in a fresh process per round,
and against the machine's float32 matmul peak:

  ours     this project's compiled train step (the trainer's own, through bench/common.py) on one CPU device,
           XLA spreading each operation over the cores (train.py's default)
  per_core the same step on one CPU device per core, data-parallel (mesh.cpu_devices_per_core, which the small
           CPU recipes set; runtime.distributed.cpu_devices_per_core)
  pytorch  HF transformers' SiglipModel (its own sigmoid loss, return_loss=True) + torch.optim.AdamW
  peak     a large float32 matmul in JAX: the most FLOP/s this machine gives a program like ours

    python bench/compare_step.py [--rounds 2] [--steps 3] [--batch 32] [--variant S/16] [--image-size 128]
                                 [--depth N]   (N blocks per tower instead of the variant's: dry runs)

Every round starts one process per implementation, in an order rotated each round, so no implementation
inherits another's thread pools, caches or heap, and none always runs right after the same other. Each
process builds its step, runs two untimed steps, then times `--steps` steps. The load average (1 min) is read
before each process starts and printed beside its time: a figure is quiet when that load is under 1.5 (on 2
cores, a load of 2 already means another job shares the CPU). Per round: ours / pytorch, and ours's FLOP/s
(FLOPs of its compiled step from XLA's cost analysis over its step time) as a share of the peak measured in
the same round; then the medians over rounds.

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
IMPLEMENTATIONS = ("ours", "per_core", "pytorch", "peak")
QUIET_LOAD = 1.5
PEAK_MATMUL_SIZE = 2048


def _time_steps(step, steps: int) -> tuple[float, list[float]]:
    """(seconds per step over `steps` timed steps, the two untimed warm-up losses)."""
    warmup = [step(), step()]
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps, warmup


def run_ours(args: argparse.Namespace, per_core: bool = False) -> dict:
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


WORKERS = {"ours": run_ours, "per_core": lambda args: run_ours(args, per_core=True), "pytorch": run_pytorch,
           "peak": run_peak}


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
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one implementation, in this fresh process: a JSON line for the parent
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    results: dict[str, list[dict]] = {name: [] for name in IMPLEMENTATIONS}
    for round_index in range(args.rounds):
        shift = round_index % len(IMPLEMENTATIONS)
        for name in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
            results[name].append(_run_worker(args, name))
        ours, per_core, pytorch, peak = (results[name][-1] for name in IMPLEMENTATIONS)
        achieved = ours["flops_per_step"] / ours["seconds_per_step"]
        print(f"round {round_index + 1}: ours {ours['seconds_per_step']:.3f} s (load {ours['load_before']:.2f}), "
              f"per_core {per_core['seconds_per_step']:.3f} s on {per_core['devices']} devices (load "
              f"{per_core['load_before']:.2f}), pytorch {pytorch['seconds_per_step']:.3f} s (load {pytorch['load_before']:.2f}), peak "
              f"{peak['flops_per_second'] / 1e9:.1f} GFLOP/s (load {peak['load_before']:.2f}); ours / pytorch "
              f"{ours['seconds_per_step'] / pytorch['seconds_per_step']:.2f}x, ours at {achieved / 1e9:.1f} GFLOP/s = "
              f"{achieved / peak['flops_per_second']:.0%} of peak", flush=True)

    ratios = [o["seconds_per_step"] / p["seconds_per_step"] for o, p in zip(results["ours"], results["pytorch"])]
    per_core = [c["seconds_per_step"] / o["seconds_per_step"] for o, c in zip(results["ours"], results["per_core"])]
    shares = [o["flops_per_step"] / o["seconds_per_step"] / k["flops_per_second"]
              for o, k in zip(results["ours"], results["peak"])]
    loads = [result["load_before"] for name in IMPLEMENTATIONS for result in results[name]]
    first = results["ours"][0]
    print(f"\n{args.variant} image + {args.variant.split('/')[0]} text ({args.depth or 'all'} blocks each), "
          f"{args.image_size} px, {args.tokens} tokens, vocab {args.vocab}, batch {args.batch}, float32 on "
          f"{first['device']}, {os.cpu_count()} CPUs, per_core on {results['per_core'][0]['devices']} CPU devices; parameters: ours {first['parameters']:,}, pytorch "
          f"{results['pytorch'][0]['parameters']:,} ({results['pytorch'][0]['threads']} torch threads); "
          f"ours {first['flops_per_step']:.3e} FLOPs a step (XLA cost analysis); load before each process "
          f"{min(loads):.2f}-{max(loads):.2f}" + ("" if max(loads) < QUIET_LOAD else
                                                  f" (not quiet: over {QUIET_LOAD} before some processes)"))
    print("| round | ours s/step | per_core s/step | per_core / ours | pytorch s/step | ours / pytorch | "
          "peak GFLOP/s | ours share of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for index, (ratio, share) in enumerate(zip(ratios, shares)):
        print(f"| {index + 1} | {results['ours'][index]['seconds_per_step']:.3f} | "
              f"{results['per_core'][index]['seconds_per_step']:.3f} | {per_core[index]:.2f}x | "
              f"{results['pytorch'][index]['seconds_per_step']:.3f} | {ratio:.2f}x | "
              f"{results['peak'][index]['flops_per_second'] / 1e9:.1f} | {share:.0%} |")
    print(f"| median | {statistics.median(r['seconds_per_step'] for r in results['ours']):.3f} | "
          f"{statistics.median(r['seconds_per_step'] for r in results['per_core']):.3f} | "
          f"{statistics.median(per_core):.2f}x | {statistics.median(r['seconds_per_step'] for r in results['pytorch']):.3f} | "
          f"{statistics.median(ratios):.2f}x | "
          f"{statistics.median(r['flops_per_second'] for r in results['peak']) / 1e9:.1f} | "
          f"{statistics.median(shares):.0%} |")


if __name__ == "__main__":
    main()
