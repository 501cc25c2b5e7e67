"""Throughput and MFU of a SigLIP B/16 train step (224 px, 64 tokens, vocab 32k) against this machine's
own matmul peak, measured in the same run.

    python bench/train_step.py [--batch 8 | --batch fill] [--steps 3] [--dtype float32] [--variant B/16]
                               [--image-size 224] [--tokens 64] [--expect-cudnn]

On a CPU the peak is a large float32 matmul timed here; on an accelerator it is the same measurement
(bf16), printed beside the vendor peak from siglip_jax.training.metrics.PEAK_TFLOPS.

`--batch fill` sizes the batch to the device: one compile at a probe batch gives the compiler's
per-example temporary bytes and the fixed state bytes, and the batch is the largest multiple of 32 that
fits in `--fill-fraction` of the device memory (then compiled again at that size). The compiled step's
HLO is searched for cuDNN's fused attention call, so the output says which attention ran; with
`--expect-cudnn` the run fails (exit 3) when a device that supports it (a GPU, bf16, head dim 64) did not
get it. Dry run on a CPU: `--variant mu/16 --image-size 32 --tokens 16 --batch 8 --steps 2`.
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the repo on the path)


def matmul_peak_tflops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


CUDNN_ATTENTION_MARKER = "__cudnn$fmha"  # custom-call target of cuDNN's fused attention in XLA GPU HLO


def attention_in(compiled) -> str:
    """Which attention kernel the compiled step runs: "cuDNN fused (flash) attention" or "XLA"."""
    return "cuDNN fused (flash) attention" if CUDNN_ATTENTION_MARKER in compiled.as_text() else "XLA"


def fill_batch_size(config, probe_batch: int, fraction: float) -> int:
    """The largest multiple of 32 whose compiled step fits in `fraction` of the first device's memory,
    assuming temporary memory grows linearly with the batch (activations) on top of the state."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        raise SystemExit("This device reports no memory limit; pass --batch N instead of --batch fill.")
    compiled, *_ = common.compiled_train_step(config, batch_size=probe_batch)
    memory = compiled.memory_analysis()
    fixed = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    per_example = memory.temp_size_in_bytes / probe_batch
    batch = int((fraction * limit - fixed) // per_example) // 32 * 32
    print(f"fill: {limit / 2**30:.1f} GiB device, state {fixed / 2**30:.2f} GiB, "
          f"{per_example / 2**20:.1f} MiB per example at batch {probe_batch} -> batch {batch}", flush=True)
    if batch < 32:
        raise SystemExit("Not even a batch of 32 fits; use a smaller variant or remat (model.remat_policy).")
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", default="8", help="examples per step, or 'fill' to fill the device")
    parser.add_argument("--fill-fraction", type=float, default=0.8, help="with --batch fill: memory share to use")
    parser.add_argument("--remat", default="none", help="model.remat_policy (none, full, dots_saveable)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--expect-cudnn", action="store_true",
                        help="exit 3 if a GPU that supports cuDNN fused attention (bf16 inputs) runs XLA's")
    args = parser.parse_args()

    import jax

    from siglip_jax.config import default_config
    from siglip_jax.models import flops
    from siglip_jax.training import metrics

    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    config = default_config()
    config.model.image.variant = args.variant
    config.model.text.variant = args.variant.split("/")[0]
    config.model.dtype = dtype
    config.model.remat_policy = args.remat
    config.model.image.image_size = args.image_size
    config.model.text.max_len = args.tokens
    args.batch = fill_batch_size(config, 32, args.fill_fraction) if args.batch == "fill" else int(args.batch)
    config.data.batch_size = args.batch

    peak = matmul_peak_tflops(dtype)
    start = time.perf_counter()
    compiled, state, batch, mesh = common.compiled_train_step(config)
    compile_seconds = time.perf_counter() - start
    state, step_metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(step_metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)
    seconds = (time.perf_counter() - start) / args.steps

    flops_per_example = flops.train_flops_per_example(config.model, args.batch)
    achieved = flops_per_example * args.batch / seconds / 1e12
    vendor = metrics.peak_tflops(device.device_kind)
    print(f"device: {device.device_kind} ({device.platform}), dtype {dtype}, {args.variant} at {args.image_size} px, "
          f"{args.tokens} tokens, batch {args.batch}")
    print(f"compile: {compile_seconds:.1f} s; step: {seconds:.3f} s; {args.batch / seconds:.2f} examples/s")
    attention = attention_in(compiled)
    print(f"attention: {attention} (model.attention={config.model.attention})")
    print(f"analytic train FLOPs/example: {flops_per_example / 1e9:.1f} GFLOP")
    print(f"achieved: {achieved:.3f} TFLOP/s; measured {dtype} matmul peak: {peak:.3f} TFLOP/s")
    print(f"MFU vs measured peak: {100 * achieved / peak:.1f}%")
    if vendor:
        print(f"MFU vs vendor peak ({vendor:.0f} TFLOP/s): {100 * achieved / vendor:.1f}%")
    else:
        print(f"MFU vs vendor peak: {device.device_kind!r} is not in siglip_jax.training.metrics.PEAK_TFLOPS")
    # cuDNN's kernel takes half-precision inputs on a GPU; anywhere else XLA's attention is the right answer.
    cudnn_expected = device.platform == "gpu" and dtype in ("bfloat16", "float16")
    verdict = "ok" if attention.startswith("cuDNN") or not cudnn_expected else "MISSING cuDNN"
    print(f"attention check: {verdict} (cuDNN expected: {cudnn_expected})")
    if args.expect_cudnn and verdict != "ok":
        raise SystemExit(3)


if __name__ == "__main__":
    main()
