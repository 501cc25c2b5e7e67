"""data.cache_decoded_mb: decoded training images kept in memory give the same batches as reading the files, and
the budget, bad images and streams are handled."""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from siglip_jax import config as config_lib
from siglip_jax.data import from_config, pipeline, preprocess
from siglip_jax.data.sources import DecodedRecordCache
from siglip_jax.data.tokenizers import ByteTokenizer

SIDE = 12  # pixels per side of the test images: 432 bytes each, decoded


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class CountingSource:
    """Records with PNG bytes, one of them unreadable; counts the reads of each index."""

    def __init__(self, size: int, bad_index: int | None = None):
        self.records = [{"image": b"not an image" if i == bad_index else _png(i), "captions": [f"picture {i}", f"photo {i}"],
                         "id": f"r{i}"} for i in range(size)]
        self.reads = [0] * size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.reads[index] += 1
        return dict(self.records[index])

    def all_captions(self):
        return [caption for record in self.records for caption in record["captions"]]


def _pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_cached_records_hold_the_decoded_pixels_and_skip_the_source():
    source = CountingSource(4)
    cache = DecodedRecordCache(source, max_bytes=2**20)
    for _ in range(3):
        for index in range(4):
            record = cache[index]
            np.testing.assert_array_equal(record["image"], _pil_pixels(source.records[index]["image"]))
            assert record["captions"] == source.records[index]["captions"] and record["id"] == f"r{index}"
    assert source.reads == [1, 1, 1, 1]  # read once each, then from memory
    assert cache.cached_bytes == 4 * SIDE * SIDE * 3
    assert len(cache) == 4 and cache.all_captions() == source.all_captions()  # the source's extras pass through
    cache[0]["image"] = None  # a consumer replacing a key does not reach the cache
    assert cache[0]["image"] is not None


def test_the_budget_bounds_the_memory_and_says_so(caplog):
    source = CountingSource(5)
    cache = DecodedRecordCache(source, max_bytes=2 * SIDE * SIDE * 3 + 10)  # room for two images
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            for index in range(5):
                image = cache[index]["image"]  # past the budget: the source's bytes, decoded by the pipeline
                pixels = image if isinstance(image, np.ndarray) else _pil_pixels(image)
                np.testing.assert_array_equal(pixels, _pil_pixels(source.records[index]["image"]))
    assert source.reads == [1, 1, 3, 3, 3]
    assert cache.cached_bytes == 2 * SIDE * SIDE * 3
    warnings = [r.getMessage() for r in caplog.records if "cache_decoded_mb" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 5 training records kept decoded" in warnings[0]


def test_bad_image_is_not_cached_and_the_pipeline_skips_it_as_before():
    def batches(cached: bool):
        source = CountingSource(16, bad_index=5)
        if cached:
            source = DecodedRecordCache(source, max_bytes=2**20)
        iterator = pipeline.train_batches(source, tokenizer=ByteTokenizer(12), seed=3, local_batch_size=4,
                                          options=preprocess.ImageOptions(8, random_crop_scale=(0.5, 1.0), random_flip=True))
        return [next(iterator) for _ in range(12)]  # three epochs

    plain, cached = batches(False), batches(True)
    for expected, got in zip(plain, cached):
        assert set(expected) == set(got)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert sum(int(batch["num_skipped"].sum()) for batch in cached) == 3  # the bad record, once an epoch


def test_a_stream_or_a_negative_budget_is_refused():
    config = config_lib.default_config()
    config.data.cache_decoded_mb = 64
    config.data.train = config_lib.source_config("webdataset_stream", shards="/data/x-{00000..00001}.tar")

    class Stream:
        stream = True

    with pytest.raises(ValueError, match=r"streams its records; set --config.data.cache_decoded_mb=0"):
        from_config.cached_source(Stream(), config.data)
    config.data.cache_decoded_mb = -1
    with pytest.raises(ValueError, match="'data.cache_decoded_mb' must be >= 0"):
        config_lib.validate(config)
