"""Compile time with and without scan over layers (depth 4, 12, 24), and the train step's temporary
memory with gradient accumulation k = 1 and k = 8 at the same global batch (from the compiler's
memory analysis, so nothing runs).

    python bench/compile_and_memory.py [--skip_compile] [--skip_memory]
"""
from __future__ import annotations

import argparse
import time

import common


def compile_seconds(depth: int, scan: bool) -> float:
    from siglip_jax.config import default_config

    config = default_config()
    config.model.image.variant = "B/16"
    config.model.image.image_size = 64  # compile time depends on the graph, not on the image size
    config.model.text.variant = "B"
    config.model.text.max_len = 16
    config.model.image.depth = config.model.text.depth = depth
    config.model.scan_layers = scan
    config.data.batch_size = 8
    start = time.perf_counter()
    common.compiled_train_step(config)
    return time.perf_counter() - start


def temporary_bytes(accum_steps: int, batch_size: int, remat: str, scan: bool) -> int:
    from siglip_jax.config import default_config

    config = default_config()  # B/16 at 224 px, 64 tokens
    config.data.batch_size = batch_size
    config.accum_steps = accum_steps
    config.model.remat_policy = remat
    config.model.scan_layers = scan
    compiled, *_ = common.compiled_train_step(config)
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_compile", action="store_true")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--batch", type=int, default=64, help="global batch for the memory comparison")
    args = parser.parse_args()
    if not args.skip_compile:
        print("Compile seconds of a B/16 train step (both towers at the given depth):")
        print("| depth | unrolled | scan |\n| --- | --- | --- |")
        for depth in (4, 12, 24):
            print(f"| {depth} | {compile_seconds(depth, False):.1f} | {compile_seconds(depth, True):.1f} |", flush=True)
    if not args.skip_memory:
        print(f"\nTemporary memory of a B/16 train step at global batch {args.batch} (one device, float32):")
        # XLA:CPU drops the optimisation barriers that keep a rematerialised forward pass from being merged
        # back into the original, so on a CPU remat only shows inside a scanned loop.
        variants = (("none", False), ("full", True), ("dots_saveable", True))
        print("| accum_steps | no remat | remat full (scan) | remat dots_saveable (scan) |\n| --- | --- | --- | --- |")
        for k in (1, 8):
            row = [temporary_bytes(k, args.batch, remat, scan) / 2**30 for remat, scan in variants]
            print(f"| {k} | " + " | ".join(f"{gib:.2f} GiB" for gib in row) + " |", flush=True)


if __name__ == "__main__":
    main()
