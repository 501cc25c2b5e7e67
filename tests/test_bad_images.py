"""An image whose header promises more pixels than max_pixels (issue 19): refused from the header, fast,
without decoding, and counted as an unusable record by the pipeline."""
import io
import time

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import images, pipeline, preprocess
from siglip_jax.data.demo import DemoSource
from siglip_jax.data.tokenizers import ByteTokenizer


@pytest.fixture(scope="module")
def bomb_png():
    """A 13000 x 13000 1-bit PNG: about 20 KB on disk, 169 M pixels (about 7 s and 0.5 GB to decode)."""
    buffer = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buffer, "PNG")
    assert len(buffer.getvalue()) < 64_000
    return buffer.getvalue()


def test_huge_header_is_refused_before_decoding(bomb_png):
    start = time.perf_counter()
    with pytest.raises(images.DecodeError, match=r"13000x13000 pixels exceeds max_pixels=67108864 .*not decoded"):
        images.decode_image(bomb_png)
    # Reading the header takes milliseconds; decoding takes seconds. The bound is loose for a busy machine.
    assert time.perf_counter() - start < 1.5


def test_max_pixels_above_pillows_own_limit_is_the_one_that_decides():
    data = io.BytesIO()
    Image.new("1", (20, 20)).save(data, "PNG")
    before = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 100  # Pillow would refuse at 2 x 100 < 400 pixels inside Image.open
        assert images.decode_image(data.getvalue(), max_pixels=400).shape == (20, 20, 3)
        with pytest.raises(images.DecodeError, match="exceeds max_pixels=399"):
            images.decode_image(data.getvalue(), max_pixels=399)
    finally:
        Image.MAX_IMAGE_PIXELS = before


class _WithABomb:
    """Demo records repeated endlessly (as the pipeline's epochs are), position 2 of the first epoch a bomb."""

    def __init__(self, bomb: bytes):
        self.inner, self.bomb = DemoSource("train", 8, 16), bomb

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        record = dict(self.inner[index % len(self.inner)])
        if index == 2:
            record["image"] = self.bomb
        return record


def test_pipeline_counts_the_huge_image_as_unusable(bomb_png):
    source = _WithABomb(bomb_png)
    examples = pipeline.TrainExamples(source, len(source), ByteTokenizer(12), preprocess.ImageOptions(image_size=16), seed=0)
    start = time.perf_counter()
    example = examples(2, source[2])
    assert time.perf_counter() - start < 1.5
    assert int(example["num_skipped"]) == 1 and example["images"].shape == (16, 16, 3)
    np.testing.assert_array_equal(example["images"], images.decode_image(source.inner[2]["image"]))
