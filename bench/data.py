"""Input pipeline throughput on Flickr8k at 224 px with 0, 1 and 2 grain workers, and the share of the
demo's training time spent waiting for data; then streamed shards: start-up to the first batch with 10
and 10,000 shards, the raw decode + random-resized-crop rate in a tight loop (the host's limit), and the
stream's images/s from local shards and from an emulated GCS bucket with 0, 1 and 2 workers.

    python bench/data.py [--batches 20] [--demo_steps 60] [--shard_images 256] [--only_shards]

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

from siglip_jax.data import pipeline, preprocess, sources  # noqa: E402
from siglip_jax.data.tokenizers import ByteTokenizer  # noqa: E402

FLICKR8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "flickr8k")


def pipeline_images_per_second(num_workers: int, num_batches: int, batch_size: int = 64) -> float:
    source = sources.make_source("flickr8k", path=FLICKR8K, split="train")
    batches = pipeline.train_batches(
        source,
        tokenizer=ByteTokenizer(64),
        options=preprocess.ImageOptions(224, random_crop_scale=(0.5, 1.0), random_flip=True),
        local_batch_size=batch_size,
        seed=0,
        num_workers=num_workers,
        prefetch_batches=4,
    )
    return _images_per_second(batches, num_batches, batch_size)


def _images_per_second(batches, num_batches: int, batch_size: int) -> float:
    """Images/s over `num_batches` batches after the first (start-up: worker processes, first reads)."""
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    seconds = time.perf_counter() - start
    if hasattr(batches, "close"):
        batches.close()
    return num_batches * batch_size / seconds


def _photos(count: int) -> list[dict]:
    """Flickr8k records (JPEG bytes, captions) if present, else synthetic 320x256 JPEGs."""
    if os.path.isdir(FLICKR8K):
        source = sources.make_source("flickr8k", path=FLICKR8K, split="train")
        return [source[index] for index in range(count)]
    import io

    import numpy as np
    from PIL import Image

    records = []
    for index in range(count):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(index).integers(0, 256, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((320, 256)).save(buffer, "JPEG", quality=90)
        records.append({"image": buffer.getvalue(), "captions": [f"photo {index}"], "id": str(index)})
    return records


class _Records:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def raw_images_per_second(records: list[dict], image_size: int = 224) -> float:
    """The same decode + random-resized crop + flip as the pipeline, in a tight loop on one core."""
    import numpy as np

    from siglip_jax.data import images

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for record in records:
        images.train_transform(images.decode_image(record["image"]), image_size, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
    return len(records) / (time.perf_counter() - start)


def stream_images_per_second(pattern: str, num_workers: int, num_images: int, batch_size: int = 32) -> float:
    source = sources.make_source("webdataset_stream", shards=pattern, shuffle_buffer=64, open_shards=2)
    batches = pipeline.train_batches(
        source, tokenizer=ByteTokenizer(64), options=preprocess.ImageOptions(224, random_crop_scale=(0.5, 1.0), random_flip=True),
        local_batch_size=batch_size, seed=0, num_workers=num_workers)
    return _images_per_second(batches, max(1, num_images // batch_size), batch_size)


def startup_seconds(directory: str, num_shards: int) -> float:
    """Seconds from naming `num_shards` one-sample shards to the first batch of 4."""
    from tools import convert

    tiny = _Records([{"image": record["image"], "captions": record["captions"], "id": record["id"]}
                     for record in _photos(1)] * num_shards)
    convert.convert(tiny, directory, format="webdataset", name="", num_shards=num_shards, validate=False, progress=False)
    start = time.perf_counter()
    source = sources.make_source("webdataset_stream", shards=os.path.join(directory, f"{{00000..{num_shards - 1:05d}}}.tar"),
                                 shuffle_buffer=4, open_shards=4)
    batches = pipeline.train_batches(source, tokenizer=ByteTokenizer(16), options=preprocess.ImageOptions(64),
                                     local_batch_size=4, seed=0)
    next(batches)
    return time.perf_counter() - start


def shard_benchmarks(num_images: int) -> None:
    from tests import remote_servers
    from tools import convert

    with tempfile.TemporaryDirectory() as directory:
        for num_shards in (10, 10_000):
            seconds = startup_seconds(os.path.join(directory, f"startup{num_shards}"), num_shards)
            print(f"Start-up to the first batch with {num_shards:,} shards: {seconds:.2f} s", flush=True)
        records = _photos(num_images)
        local = os.path.join(directory, "shards")
        manifest = convert.convert(_Records(records), local, format="webdataset", name="", num_shards=4, validate=False, progress=False)
        raw = raw_images_per_second(records)
        print(f"Raw decode + random-resized crop + flip at 224 px, tight loop, one core: {raw:.0f} images/s")
        env, gs_bucket, _, stop = remote_servers.start_servers(directory)
        os.environ.update(env)
        try:
            import fsspec

            remote = f"{gs_bucket}/bench"
            for name in manifest["shards"]:
                with open(os.path.join(local, name), "rb") as stream, fsspec.open(f"{remote}/{name}", "wb") as target:
                    target.write(stream.read())
            patterns = {"local shards": manifest["pattern"], "emulated GCS bucket": f"{remote}/{{00000..00003}}.tar"}
            print("| shards from | workers | images/s | per core used vs raw |\n| --- | --- | --- | --- |")
            for where, pattern in patterns.items():
                for workers in (0, 1, 2):
                    rate = stream_images_per_second(pattern, workers, num_images)
                    cores = max(1, min(workers, os.cpu_count() or 1))
                    print(f"| {where} | {workers} | {rate:.0f} | {100 * rate / cores / raw:.0f}% |", flush=True)
        finally:
            stop()


def demo_data_wait(steps: int) -> dict:
    import importlib.util

    from siglip_jax.training import trainer

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
    parser.add_argument("--shard_images", type=int, default=256, help="images timed per streamed-shard case")
    parser.add_argument("--only_shards", action="store_true", help="run only the streamed-shard part")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}")
    shard_benchmarks(args.shard_images)
    if args.only_shards:
        return
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
