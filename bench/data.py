"""Input pipeline throughput on Flickr8k at 224 px with 0, 1 and 2 grain workers, and the share of the
demo's training time spent waiting for data.

    python bench/data.py [--batches 20] [--demo_steps 60]

Reads ../shared/data/flickr8k in place; skips that part with a message where it is absent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import flags  # noqa: E402

flags.FLAGS(["bench"])  # grain's worker processes read absl flags

from siglip_jax.data import pipeline, sources  # noqa: E402
from siglip_jax.data.tokenizers import ByteTokenizer  # noqa: E402

FLICKR8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "flickr8k")


def pipeline_images_per_second(num_workers: int, num_batches: int, batch_size: int = 64) -> float:
    source = sources.make_source("flickr8k", path=FLICKR8K, split="train")
    batches = pipeline.train_batches(
        source,
        tokenizer=ByteTokenizer(64),
        options=pipeline.ImageOptions(224, random_crop_scale=(0.5, 1.0), random_flip=True),
        local_batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        prefetch_batches=4,
    )
    next(batches)  # start-up (worker processes, first reads) is not throughput
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    seconds = time.perf_counter() - start
    if hasattr(batches, "close"):
        batches.close()
    return num_batches * batch_size / seconds


def demo_data_wait(steps: int) -> dict:
    import importlib.util

    from siglip_jax import trainer

    spec = importlib.util.spec_from_file_location("demo", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config()
    config.total_steps = steps
    config.log_every_steps = steps // 3
    config.evals = {}
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as stream:
            lines = [json.loads(line) for line in stream]
    measured = [line for line in lines[1:] if "data_wait_fraction" in line]  # the first window holds compilation
    return {
        "data_wait_fraction": sum(line["data_wait_fraction"] for line in measured) / len(measured),
        "seconds_per_step": sum(line["seconds_per_step"] for line in measured) / len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="batches of 64 timed per worker count")
    parser.add_argument("--demo_steps", type=int, default=60)
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}")
    if os.path.isdir(FLICKR8K):
        print("Flickr8k train pipeline at 224 px (decode, random-resized crop, flip, tokenize, batch of 64):")
        print("| workers | images/s |\n| --- | --- |")
        for workers in (0, 1, 2):
            print(f"| {workers} | {pipeline_images_per_second(workers, args.batches):.0f} |", flush=True)
    else:
        print(f"Skipping the Flickr8k part: {os.path.normpath(FLICKR8K)} is absent.")
    demo = demo_data_wait(args.demo_steps)
    print(
        f"Demo training: {demo['seconds_per_step'] * 1000:.0f} ms/step, waiting for data "
        f"{100 * demo['data_wait_fraction']:.1f}% of the time (target: under 5%)."
    )


if __name__ == "__main__":
    main()
