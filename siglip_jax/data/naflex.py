"""NaFlex images (SigLIP 2): an image resized, aspect ratio kept, so its patch grid fills a budget of
`max_patches`, cut into flattened patches and padded to the budget; one fixed-shape array per image.

The packed layout, [max_patches, patch * patch * 3 + GRID_CHANNELS] uint8, carries all three things the
tower needs in one array, so batches stay one fixed-shape array through the pipeline, the embedder's
buckets, the train step and StableHLO export exactly like square images:
  * row k < rows * cols: patch k of the grid in row-major order, its pixels flattened (y, x, channel)
    as HF's Siglip2ImageProcessor does; rows past the grid are zero padding;
  * the last GRID_CHANNELS bytes of every row: the grid (rows, cols) as two big-endian uint16. The mask
    is "row index < rows * cols"; padding of a whole batch entry (grid 0 x 0) masks everything.
The model maps uint8 to [-1, 1] before the tower (x / 127.5 - 1), which is exact enough to read the
grid bytes back (models/naflex.py); `pack` also takes float patches already in [-1, 1].
"""
from __future__ import annotations

import math

import numpy as np

from siglip_jax.data import images

GRID_CHANNELS = 4  # (rows, cols) as two big-endian uint16 at the end of every row
MAX_GRID_SIDE = 2**16 - 1


def image_size_for_max_patches(height: int, width: int, patch_size: int, max_patches: int,
                               eps: float = 1e-5) -> tuple[int, int]:
    """(target height, target width) in pixels, multiples of `patch_size`, with the aspect ratio of
    `height` x `width` kept (each side rounded up to whole patches) and the most patches <= `max_patches`.

    The same bisection over the scale as HF's `get_image_size_for_max_num_patches` (SigLIP 2), so the same
    image gets the same grid here and there. Refuses an image smaller than one patch, and a budget that
    cannot hold one row of patches at the image's aspect ratio (it could only be met by distorting it).
    """
    if patch_size < 1 or max_patches < 1:
        raise ValueError(f"patch_size ({patch_size}) and max_patches ({max_patches}) must be positive.")
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"Image {height}x{width} is smaller than one {patch_size}x{patch_size} patch; use images at least "
            f"{patch_size} pixels on each side (or a smaller patch size).")
    row_patches = math.ceil(max(height, width) / min(height, width))
    if row_patches > max_patches:
        raise ValueError(
            f"Image {height}x{width} needs at least {row_patches} patches for one row at its aspect ratio, more "
            f"than max_patches={max_patches}; raise the budget to >= {row_patches} or crop the image.")

    def scaled(size: int, scale: float) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    low, high = eps / 10, 100.0
    while high - low >= eps:
        scale = (low + high) / 2
        patches = (scaled(height, scale) / patch_size) * (scaled(width, scale) / patch_size)
        if patches <= max_patches:
            low = scale
        else:
            high = scale
    return scaled(height, low), scaled(width, low)


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[rows * p, cols * p, c] -> [rows * cols, p * p * c]: patches row-major, each flattened (y, x, c)."""
    height, width, channels = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image {height}x{width} is not a whole number of {patch_size}x{patch_size} patches; "
                         "resize it with image_size_for_max_patches first.")
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


def grid_bytes(rows: int, cols: int) -> np.ndarray:
    """[GRID_CHANNELS] uint8: rows and cols as big-endian uint16."""
    if not (0 <= rows <= MAX_GRID_SIDE and 0 <= cols <= MAX_GRID_SIDE):
        raise ValueError(f"Patch grid {rows}x{cols} does not fit the layout (at most {MAX_GRID_SIDE} a side).")
    return np.array([rows >> 8, rows & 255, cols >> 8, cols & 255], np.uint8)


def pack(patches: np.ndarray, grid: tuple[int, int], max_patches: int) -> np.ndarray:
    """Patches [rows * cols, d] of a `grid` = (rows, cols) -> the packed [max_patches, d + GRID_CHANNELS]
    array (see the module doc). uint8 patches give uint8; float patches (in [-1, 1]) give float32 with
    the grid bytes mapped to [-1, 1] the same way the model maps uint8."""
    rows, cols = grid
    if patches.shape[0] != rows * cols:
        raise ValueError(f"{patches.shape[0]} patches do not make a {rows}x{cols} grid.")
    if rows * cols > max_patches:
        raise ValueError(f"A {rows}x{cols} patch grid ({rows * cols} patches) exceeds max_patches={max_patches}; "
                         "resize with image_size_for_max_patches for this budget.")
    trailer = grid_bytes(rows, cols)
    dtype = np.uint8 if patches.dtype == np.uint8 else np.float32
    if dtype != np.uint8:
        trailer = trailer.astype(np.float32) / 127.5 - 1.0
    packed = np.zeros((max_patches, patches.shape[1] + GRID_CHANNELS), dtype)
    packed[: rows * cols, : patches.shape[1]] = patches
    packed[:, patches.shape[1]:] = trailer
    return packed


def unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A uint8 packed array [n, d + GRID_CHANNELS] -> (patches [n, d], mask [n] bool, (rows, cols))."""
    trailer = packed[0, -GRID_CHANNELS:].astype(np.int64)
    rows, cols = int(trailer[0] * 256 + trailer[1]), int(trailer[2] * 256 + trailer[3])
    mask = np.arange(packed.shape[0]) < rows * cols
    return packed[:, :-GRID_CHANNELS], mask, (rows, cols)


def naflex_transform(image: np.ndarray, patch_size: int, max_patches: int, method: str = "bilinear") -> np.ndarray:
    """[H, W, 3] uint8 -> packed uint8 [max_patches, p * p * 3 + GRID_CHANNELS]: resized (antialiased,
    aspect ratio kept) to the grid that fills the budget, patchified and padded. An image this budget
    cannot take (smaller than a patch, too elongated for one row) raises images.DecodeError, which the
    pipeline skips and names like an unreadable file."""
    try:
        height, width = image_size_for_max_patches(image.shape[0], image.shape[1], patch_size, max_patches)
    except ValueError as error:
        raise images.DecodeError(str(error)) from None
    if (height, width) != image.shape[:2]:
        image = images.resize(image, (height, width), method)
    return pack(patchify(image, patch_size), (height // patch_size, width // patch_size), max_patches)


def packed_channels(patch_size: int) -> int:
    """The last dimension of a packed NaFlex image with this patch size."""
    return patch_size * patch_size * 3 + GRID_CHANNELS
