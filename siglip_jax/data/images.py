"""Image decoding and the per-example transforms: bytes or arrays in, HxWx3 uint8 out.

Everything here is a pure function on one image (numpy in, numpy out) so the grain pipeline can run
it in worker processes and tests can check it against numpy references. Resizing uses Pillow, which
antialiases when it shrinks an image (a triangle/bicubic filter widened by the scale factor), so
small details average out instead of aliasing into noise.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

# An 8k x 8k image decodes to 200 MB and takes seconds; anything larger in a caption data set (resized to
# a few hundred pixels for the model anyway) is almost surely a decompression bomb or a broken header,
# and it would stall a data worker. Kept under Pillow's own default limit (89 M pixels, where it starts
# to warn), so ours is the check that decides, from the header, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray]
Size = Union[int, Sequence[int]]

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


class DecodeError(ValueError):
    """An image that cannot be turned into pixels; the message says why. The pipeline skips the
    example and counts it, so one bad file never stops a run."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def image_format(data: bytes) -> str | None:
    """The container format from the magic bytes ("jpeg", "png", "webp", "gif", "bmp"), or None."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return None


def decode_image(data: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes encoded bytes (JPEG, PNG, WebP, GIF, BMP, ...) or converts an array to [H, W, 3] uint8.

    Handles grayscale, CMYK, palette, 16-bit and alpha images and applies the EXIF orientation, so
    a phone photo stored sideways comes out upright. Transparent pixels are composited on white
    (see `_composite_on_white` for why). Raises DecodeError, naming the reason, for anything that
    cannot be read.
    """
    if isinstance(data, np.ndarray):
        return _array_to_rgb(data)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(
            f"Expected encoded image bytes or a numpy array, got {type(data).__name__}. "
            "Sources must put the file's bytes (or an HxWx3 uint8 array) under 'image'.")
    if len(data) == 0:
        raise DecodeError("Empty image data (0 bytes): the file is empty or was not downloaded.")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow's own limit (documented as the setting to change) refuses at twice this inside
        # Image.open, before our check could; raised (never lowered) so that max_pixels decides.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between its limit and twice it; we decide here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"Image of {width}x{height} pixels exceeds max_pixels={max_pixels} (refused from its header, "
                    "not decoded); raise max_pixels if such images are expected.")
            image.load()  # Decode now: truncated files only fail here, not in Image.open.
    except DecodeError:
        raise
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...).
        kind = image_format(data) or "unknown format"
        raise DecodeError(f"Cannot decode image ({kind}, {len(data)} bytes): {error}") from error
    image = _apply_exif_orientation(image)
    return _pil_to_rgb(image)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # Malformed EXIF is common in scraped data; an unrotated image is better than none.
        return image


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them, which would
        # turn most of a 16-bit image white, so we scale in numpy.
        return _array_to_rgb(np.asarray(image))
    if mode == "F":
        return _array_to_rgb(np.asarray(image))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    # CMYK, YCbCr, LAB, HSV, P, L, 1: Pillow's own conversions are exact for our purpose.
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blends [H, W, 4] uint8 over a white background -> [H, W, 3] uint8.

    White, not black and not "drop alpha": transparent images on the web (logos, icons, product
    shots, diagrams) are drawn to be seen on white pages, so white is what the caption's author
    saw. Dropping alpha instead exposes whatever colour the encoder left under transparent pixels,
    often black, which erases black-on-transparent logos and text entirely.
    """
    color = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    blended = color * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of uint8/uint16/int/float -> [H, W, 3] uint8."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise DecodeError(
            f"Image array has shape {array.shape}; expected [H, W], [H, W, 1], [H, W, 3] or "
            "[H, W, 4] with H, W > 0.")
    array = _to_uint8(array)
    if array.shape[-1] == 4:
        return _composite_on_white(array)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        # Floats are taken to be in [0, 1], the convention of PIL "F" images and most libraries.
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        # Integer images deeper than 8 bits are 16-bit in practice (PNG, TIFF). Pillow hands some
        # of them over as int32 ("I" mode) without saying the depth, so an int image whose values
        # all fit in 8 bits is kept as 8-bit rather than darkened 257-fold.
        wide = array.astype(np.int64)
        if array.dtype == np.uint16 or wide.max() > 255:
            return np.clip((wide * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return np.clip(wide, 0, 255).astype(np.uint8)
    raise DecodeError(f"Unsupported image array dtype {array.dtype}; use uint8, uint16 or float.")


def encode_image(image: np.ndarray, format: str = "png", quality: int = 95) -> bytes:
    """[H, W, 3] uint8 -> encoded bytes ("png": lossless, the default; "jpeg" or "webp")."""
    formats = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
    if format not in formats:
        raise ValueError(f"Unknown image format {format!r}; valid formats: {sorted(formats)}.")
    buffer = io.BytesIO()
    options = {} if formats[format] == "PNG" else {"quality": quality}
    Image.fromarray(_array_to_rgb(np.asarray(image))).save(buffer, formats[format], **options)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def _height_width(size: Size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size must be positive, got {size!r}; pass an int or (height, width).")
    return height, width


def _resample(method: str) -> Image.Resampling:
    if method not in _RESAMPLING:
        raise ValueError(f"Unknown resize method {method!r}; valid methods: {sorted(_RESAMPLING)}.")
    return _RESAMPLING[method]


def resize(image: np.ndarray, size: Size, method: str = "bilinear",
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Resizes [H, W, 3] uint8 to [height, width, 3] uint8 with antialiasing.

    `size` is an int (square) or (height, width); aspect ratio is not kept. `box` = (left, top,
    right, bottom) in input pixels, fractional allowed, crops and resizes in one filtering pass,
    which is both faster and sharper than cropping to whole pixels first.
    """
    height, width = _height_width(size)
    pil_image = Image.fromarray(image)
    resized = pil_image.resize((width, height), resample=_resample(method), box=box)
    return np.asarray(resized, dtype=np.uint8)


def random_crop_box(image_height: int, image_width: int, rng: np.random.Generator,
                    scale: tuple[float, float], ratio: tuple[float, float]
                    ) -> tuple[float, float, float, float]:
    """Samples (left, top, right, bottom) covering a `scale` fraction of the image's area with an
    aspect ratio `ratio` times the image's own.

    The ratio is relative to the image (1.0 keeps its shape) rather than absolute as in Inception
    crops, so scale=(1, 1), ratio=(1, 1) is exactly the whole image, SigLIP's recipe. A crop that
    would overflow is clamped to the image instead of resampled, so this never loops.
    """
    min_scale, max_scale = scale
    min_ratio, max_ratio = ratio
    if not 0 < min_scale <= max_scale <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}; e.g. (0.08, 1.0).")
    if not 0 < min_ratio <= max_ratio:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}; e.g. (3/4, 4/3).")
    area_fraction = rng.uniform(min_scale, max_scale)
    # Log-uniform so that stretching by r and by 1/r are equally likely.
    relative_ratio = np.exp(rng.uniform(np.log(min_ratio), np.log(max_ratio)))
    crop_width = min(image_width * np.sqrt(area_fraction * relative_ratio), image_width)
    crop_height = min(image_height * np.sqrt(area_fraction / relative_ratio), image_height)
    left = rng.uniform(0, image_width - crop_width)
    top = rng.uniform(0, image_height - crop_height)
    return (float(left), float(top), float(left + crop_width), float(top + crop_height))


# --------------------------------------------------------------------------------------------
# Transforms used by the pipeline
# --------------------------------------------------------------------------------------------

def train_transform(image: np.ndarray, size: Size, rng: np.random.Generator,
                    scale: tuple[float, float] = (1.0, 1.0),
                    ratio: tuple[float, float] = (1.0, 1.0),
                    flip: bool = False, method: str = "bilinear") -> np.ndarray:
    """Random-resized crop (+ optional horizontal flip): [H, W, 3] uint8 -> [size, size, 3] uint8.

    The defaults (whole image, no flip) are SigLIP's pretraining recipe, `decode|resize(224)`:
    the image is squashed to the square, never cropped, so no captioned object is cut away. For
    Inception-style augmentation pass scale=(0.08, 1.0), ratio=(3/4, 4/3), flip=True; flipping is
    off by default because captions say "left" and "right".
    """
    image_height, image_width = image.shape[:2]
    box = random_crop_box(image_height, image_width, rng, scale, ratio)
    out = resize(image, size, method, box=box)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_transform(image: np.ndarray, size: Size, crop: bool = False,
                   method: str = "bilinear") -> np.ndarray:
    """Deterministic eval view: [H, W, 3] uint8 -> [size, size, 3] uint8.

    crop=False (default, as big_vision's SigLIP evals `resize(224)`) squashes the whole image to
    the square, matching training. crop=True resizes the shorter side to `size` and centre-crops,
    the CLIP/ImageNet convention, which keeps the aspect ratio but cuts off the borders.
    """
    if not crop:
        return resize(image, size, method)
    height, width = _height_width(size)
    image_height, image_width = image.shape[:2]
    # Scale so the target just fits inside the image, then take the centred window; done as one
    # box-resize, which equals "resize shorter side, centre crop" without rounding to pixels twice.
    scale = max(height / image_height, width / image_width)
    crop_height, crop_width = height / scale, width / scale
    top = (image_height - crop_height) / 2
    left = (image_width - crop_width) / 2
    return resize(image, (height, width), method,
                  box=(left, top, left + crop_width, top + crop_height))


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1] (big_vision's value_range(-1, 1))."""
    return np.asarray(image, dtype=np.float32) * (2.0 / 255.0) - 1.0
