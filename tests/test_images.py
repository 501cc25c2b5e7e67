"""Image decoding and transforms against numpy references and hand-built files."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siglip_jax.data import images

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _encode(pil_image, format, **options):
    buffer = io.BytesIO()
    pil_image.save(buffer, format, **options)
    return buffer.getvalue()


def _blocks(height=32, width=48, seed=0):
    """An image of flat 16x16 blocks, aligned to JPEG's macroblocks so that lossy coding keeps
    each block's colour within a few levels."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colors, 16, axis=0), 16, axis=1)


def _png_16bit_rgb(array: np.ndarray) -> bytes:
    """Writes a 16-bit RGB PNG by hand (Pillow cannot), as an independent test file."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(tag, payload):
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("format", ["PNG", "WEBP"])
def test_lossless_formats_round_trip_exactly(format):
    pixels = _blocks()
    options = {"lossless": True} if format == "WEBP" else {}
    decoded = images.decode_image(_encode(Image.fromarray(pixels), format, **options))
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_decodes_close_to_source():
    pixels = _blocks()
    decoded = images.decode_image(_encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert decoded.shape == pixels.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - pixels).mean() < 3


def test_grayscale_becomes_three_equal_channels():
    gray = _blocks()[..., 0]
    decoded = images.decode_image(_encode(Image.fromarray(gray, "L"), "PNG"))
    np.testing.assert_array_equal(decoded, np.stack([gray] * 3, axis=-1))


def test_rgba_is_composited_on_white():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    decoded = images.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    alpha = rgba[..., 3:] / 255.0
    expected = np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    np.testing.assert_array_equal(decoded, expected.astype(np.uint8))


def test_fully_transparent_black_logo_comes_out_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black, alpha 0 everywhere
    decoded = images.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (decoded == 255).all()


def test_palette_with_transparency():
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    data = _encode(palette_image, "PNG", transparency=1)  # blue is transparent
    decoded = images.decode_image(data)
    expected_index = np.array([[0, 1, 0, 1], [1, 1, 0, 0]])
    expected = np.where(expected_index[..., None] == 0, [255, 0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded, expected)


def test_cmyk_jpeg_converts_to_rgb():
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    decoded = images.decode_image(_encode(cyan, "JPEG", quality=95))
    np.testing.assert_allclose(decoded.reshape(-1, 3).mean(0), [0, 255, 255], atol=4)


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 1000, 50000]], dtype=np.uint16)
    decoded = images.decode_image(_encode(Image.fromarray(values), "PNG"))
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decoded[..., 0], expected)
    np.testing.assert_array_equal(decoded[..., 2], expected)


def test_16bit_rgb_png():
    rng = np.random.default_rng(2)
    values = rng.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    decoded = images.decode_image(_png_16bit_rgb(values))
    # Any sane 16->8 bit reduction is within one level of value/257.
    assert np.abs(decoded.astype(int) - values / 257.0).max() <= 1


def test_exif_orientation_is_applied():
    pixels = _blocks(16, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    decoded = images.decode_image(data)
    expected = np.rot90(pixels, k=-1)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("array,expected_shape", [
    (np.zeros((5, 6), np.uint8), (5, 6, 3)),
    (np.zeros((5, 6, 1), np.uint8), (5, 6, 3)),
    (np.zeros((5, 6, 3), np.uint8), (5, 6, 3)),
    (np.zeros((5, 6, 4), np.uint8), (5, 6, 3)),
    (np.full((5, 6, 3), 65535, np.uint16), (5, 6, 3)),
])
def test_arrays_pass_through_as_rgb_uint8(array, expected_shape):
    decoded = images.decode_image(array)
    assert decoded.shape == expected_shape and decoded.dtype == np.uint8


@pytest.mark.parametrize("data,reason", [
    (b"", "Empty"),
    (b"definitely not an image" * 10, "Cannot decode"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    ("a string", "Expected encoded image bytes"),
])
def test_unreadable_inputs_raise_decode_error_with_reason(data, reason):
    with pytest.raises(images.DecodeError, match=reason):
        images.decode_image(data)


def test_truncated_jpeg_raises_decode_error():
    data = _encode(Image.fromarray(_blocks(64, 64)), "JPEG")
    with pytest.raises(images.DecodeError, match="jpeg"):
        images.decode_image(data[: len(data) // 2])


def test_oversized_image_is_refused():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(images.DecodeError, match="max_pixels"):
        images.decode_image(data, max_pixels=99 * 100)


def test_image_format_sniffing():
    pixels = Image.fromarray(_blocks())
    for format, name in [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")]:
        assert images.image_format(_encode(pixels, format)) == name
    assert images.image_format(b"nope") is None


# ------------------------------------------------------------------------------------ geometry

def test_resize_matches_jax_antialiased_linear_resize():
    """jax.image.resize(antialias=True) is an independent implementation of the same filter."""
    import jax

    rng = np.random.default_rng(3)
    coarse = rng.uniform(0, 255, (9, 12, 3))
    smooth = np.asarray(jax.image.resize(coarse, (72, 96, 3), "linear")).round().astype(np.uint8)
    ours = images.resize(smooth, (24, 40))
    reference = np.asarray(jax.image.resize(smooth.astype(np.float32), (24, 40, 3), "linear",
                                            antialias=True))
    difference = np.abs(ours.astype(np.float32) - reference)
    assert difference.mean() < 0.6 and difference.max() <= 3


def test_resize_antialiases_fine_patterns():
    checkerboard = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    checkerboard = np.stack([checkerboard] * 3, -1)
    small = images.resize(checkerboard, 8)
    # Without antialiasing, point sampling would return pure black or pure white.
    assert np.abs(small.astype(int) - 127.5).max() < 4


def test_eval_transform_default_squashes_whole_image():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = 255  # left half white
    out = images.eval_transform(image, 16)
    assert out.shape == (16, 16, 3)
    assert out[:, :7].min() == 255 and out[:, 9:].max() == 0


def test_eval_transform_crop_keeps_the_centre():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 200  # the centre 40x40 square
    out = images.eval_transform(image, 20, crop=True)
    assert out.shape == (20, 20, 3)
    # The outermost columns blend with their dark neighbours through the filter's support,
    # as they would with "resize, then crop"; everything inside is the centre square.
    assert (out[:, 1:-1] == 200).all() and out[:, [0, -1]].min() > 150


def test_train_transform_default_equals_eval_resize():
    image = _blocks(24, 40)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(images.train_transform(image, 16, rng),
                                  images.eval_transform(image, 16))


def test_random_crop_box_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(4)
    for _ in range(500):
        left, top, right, bottom = images.random_crop_box(60, 90, rng, (0.2, 0.5), (0.75, 1.33))
        assert 0 <= left < right <= 90 and 0 <= top < bottom <= 60
        area_fraction = (right - left) * (bottom - top) / (60 * 90)
        assert 0.2 - 1e-9 <= area_fraction <= 0.5 + 1e-9
        relative_ratio = ((right - left) / (bottom - top)) / (90 / 60)
        assert 0.75 - 1e-9 <= relative_ratio <= 1.33 + 1e-9


def test_train_transform_flip_and_determinism():
    image = _blocks(32, 32)
    outputs = [images.train_transform(image, 32, np.random.default_rng(seed), flip=True)
               for seed in range(20)]
    flipped = sum(np.array_equal(out, image[:, ::-1]) for out in outputs)
    unflipped = sum(np.array_equal(out, image) for out in outputs)
    assert flipped + unflipped == 20 and 0 < flipped < 20
    again = images.train_transform(image, 32, np.random.default_rng(0), flip=True)
    np.testing.assert_array_equal(again, outputs[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": (0.0, 1.0)}, "scale"), ({"scale": (0.9, 0.5)}, "scale"),
    ({"ratio": (2.0, 1.0)}, "ratio"), ({"method": "cubic"}, "bicubic"),
])
def test_bad_transform_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        images.train_transform(_blocks(), 8, np.random.default_rng(0), **kwargs)


def test_to_model_range():
    out = images.to_model_range(np.array([0, 127, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)


# ----------------------------------------------------------------------------------- real data

def test_real_photos_decode():
    folders = [SHARED_DATA / "flickr8k" / "Images", SHARED_DATA / "coco_mini" / "val2017",
               SHARED_DATA / "cifar10" / "test" / "cat"]
    if not all(folder.is_dir() for folder in folders):
        pytest.skip(f"shared data not found under {SHARED_DATA.resolve()} (only on the dev box)")
    for folder in folders:
        for path in sorted(folder.glob("*.jpg"))[:5]:
            decoded = images.decode_image(path.read_bytes())
            assert decoded.ndim == 3 and decoded.shape[-1] == 3 and decoded.dtype == np.uint8
            assert images.eval_transform(decoded, 32).shape == (32, 32, 3)
