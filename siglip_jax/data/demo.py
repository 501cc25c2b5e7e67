"""The demo dataset: coloured shapes on a dark background with captions naming colour, shape, size and
position, rendered on the fly. Seeded and deterministic: record i of a split is always the same image,
and the splits draw from disjoint seed streams, so the eval split is held out. Nothing is downloaded.
"""
from __future__ import annotations

import math
import threading

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.13, "large": 0.24}  # half-extent as a fraction of the image side
POSITIONS = {  # (row, column) of a 3 x 3 grid
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "middle": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
TEMPLATES = (
    "a {size} {colour} {shape} at the {position}",
    "{colour} {shape}, {size}, {position}",
    "{position}: a {size} {colour} {shape}",
    "the {shape} is {colour} and {size}, {position}",
    "{size} {shape} in {colour} at {position}",
)
SPLIT_SEEDS = {"train": 0, "eval": 1}
ATTRIBUTE_COMBINATIONS = tuple(
    {"colour": colour, "shape": shape, "size": size, "position": position}
    for colour in COLOURS for shape in SHAPES for size in SIZES for position in POSITIONS
)  # 8 x 4 x 2 x 9 = 576


CACHE_BYTES = 1 << 30  # splits up to this size are kept in memory once rendered
RENDER_BLOCK = 32  # records rendered together on first access: as fast per record as a whole split (~110 us at 32 px)


def _shape_masks(shape_ids: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: np.ndarray) -> np.ndarray:
    """[n, s, s] pixels inside each image's shape; rows/cols are [n, s, s] offsets from its centre and
    half [n, 1, 1] its half-extent. All four shapes are computed and one chosen per image (cheap at
    these sizes, and free of per-image Python)."""
    abs_rows, abs_cols = np.abs(rows), np.abs(cols)
    arm = half * 0.35
    masks = np.stack([
        rows**2 + cols**2 <= half**2,  # circle
        (abs_rows <= half * 0.85) & (abs_cols <= half * 0.85),  # square
        (rows >= -half) & (rows <= half) & (abs_cols <= (rows + half) / 2),  # triangle, apex up
        (abs_rows <= half) & (abs_cols <= half) & ((abs_rows <= arm) | (abs_cols <= arm)),  # cross
    ])
    return np.take_along_axis(masks, shape_ids[None, :, None, None], axis=0)[0]


def render_block(combinations: np.ndarray, image_size: int, rngs: list[np.random.Generator],
                 width: int | None = None) -> np.ndarray:
    """[n, image_size, width (default image_size), 3] uint8 images, one shape each, for indices into
    ATTRIBUTE_COMBINATIONS, each drawn from its own random stream (jitter, size, shade, background and noise).
    Positions are cells of a 3 x 3 grid over the whole picture; a shape's size follows the shorter side."""
    height, width = image_size, width or image_size
    n = len(combinations)
    attributes = [ATTRIBUTE_COMBINATIONS[c] for c in combinations]
    draws = np.array([rng.uniform(0, 1, 4) for rng in rngs], np.float32).reshape(n, 4)
    cell = np.array([height / 3, width / 3], np.float32)  # (row, column) extents of a grid cell
    grid = np.array([POSITIONS[a["position"]] for a in attributes], np.float32).reshape(n, 2)  # (row, column)
    centres = (grid + 0.5) * cell + (draws[:, 0:2] * 0.24 - 0.12) * cell
    half = np.array([SIZES[a["size"]] for a in attributes], np.float32) * min(height, width) * (0.9 + 0.2 * draws[:, 2])
    pixel_rows = np.arange(height, dtype=np.float32) + 0.5
    pixel_cols = np.arange(width, dtype=np.float32) + 0.5
    rows, cols = np.broadcast_arrays(
        pixel_rows[None, :, None] - centres[:, 0, None, None], pixel_cols[None, None, :] - centres[:, 1, None, None]
    )
    shape_ids = np.array([SHAPES.index(a["shape"]) for a in attributes], np.int64)
    masks = _shape_masks(shape_ids, rows, cols, half[:, None, None])
    backgrounds = np.array([rng.integers(10, 60, size=3) for rng in rngs], np.float32).reshape(n, 1, 1, 3)
    noise = [rng.normal(0, 6, size=(height, width, 3)) for rng in rngs]  # texture
    images = backgrounds + np.asarray(noise, np.float32).reshape(n, height, width, 3)
    colours = np.array([COLOURS[a["colour"]] for a in attributes], np.float32).reshape(n, 3) * (0.85 + 0.15 * draws[:, 3:4])
    images = np.where(masks[..., None], colours[:, None, None, :], images)
    return np.clip(images, 0, 255).astype(np.uint8)


def captions_for(attributes: dict[str, str]) -> list[str]:
    return [template.format(**attributes) for template in TEMPLATES]


class DemoSource:
    """A grain random-access source: record i -> {"image": uint8 [h, w, 3], "captions": 5 strings, "id"}.

    Square image_size pictures by default; with `aspect_ratios` (width / height) record i is drawn at
    aspect_ratios[i % n], with about image_size^2 pixels (h = s / sqrt(r), w = s * sqrt(r)): the pictures
    NaFlex towers are for (configs/demo.py:naflex). A split of up to CACHE_BYTES of pixels is kept in
    memory as it is rendered, RENDER_BLOCK consecutive records at a time on first access (vectorised), so a
    run's first batch waits for the blocks it touches (~0.5 s for 128 shuffled records), not for the whole split
    (5.4 s for 50,000 images of 32 px), and a record costs microseconds once its block is in; larger splits
    render each record on access. Record i is
    the same either way.
    """

    def __init__(self, split: str = "train", size: int = 50_000, image_size: int = 32, seed: int = 0,
                 aspect_ratios: tuple[float, ...] = (1.0,)):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"Unknown demo split {split!r}; valid: {', '.join(SPLIT_SEEDS)}.")
        if size <= 0:
            raise ValueError(f"Demo split size must be positive, got {size}.")
        if not aspect_ratios or any(not ratio > 0 for ratio in aspect_ratios):
            raise ValueError(f"Demo aspect_ratios must be positive widths over heights, e.g. (1.0, 2.0); got {aspect_ratios!r}.")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.aspect_ratios = tuple(float(ratio) for ratio in aspect_ratios)
        # (height, width) of each ratio, about image_size^2 pixels each: the same detail at every shape.
        self._shapes = tuple((max(1, round(image_size / math.sqrt(ratio))), max(1, round(image_size * math.sqrt(ratio))))
                             for ratio in self.aspect_ratios)
        if split == "eval":
            # Distinct attribute combinations (while the split has at most 576 records), so every caption
            # describes exactly one eval image and retrieval has one right answer.
            order = np.random.default_rng([seed, SPLIT_SEEDS[split]]).permutation(len(ATTRIBUTE_COMBINATIONS))
            self._combinations = order[np.arange(size) % len(order)]
        else:
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
            self._combinations = rng.integers(len(ATTRIBUTE_COMBINATIONS), size=size)
        self._images: np.ndarray | list | None = None
        self._rendered: np.ndarray | None = None  # per RENDER_BLOCK block: in self._images yet
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.size

    def _image(self, index: int) -> np.ndarray:
        if self.size * max(height * width for height, width in self._shapes) * 3 > CACHE_BYTES:
            return self._render(np.array([index]))[0]
        block = index // RENDER_BLOCK
        with self._lock:
            if self._images is None:
                self._images = (np.empty((self.size, *self._shapes[0], 3), np.uint8) if len(self._shapes) == 1
                                else [None] * self.size)
                self._rendered = np.zeros(-(-self.size // RENDER_BLOCK), bool)
            if not self._rendered[block]:
                self._render_into_cache(block)
            return self._images[index]

    def _render_into_cache(self, block: int) -> None:
        """Renders block `block`'s records into self._images, one aspect ratio at a time (the renderer is
        vectorised per shape)."""
        indices = np.arange(block * RENDER_BLOCK, min((block + 1) * RENDER_BLOCK, self.size))
        for shape in range(len(self._shapes)):
            of_shape = indices[indices % len(self._shapes) == shape]
            if len(of_shape):
                for index, image in zip(of_shape, self._render(of_shape)):
                    self._images[index] = image
        self._rendered[block] = True

    def _render(self, indices: np.ndarray) -> np.ndarray:
        """Records of one aspect ratio (indices equal modulo len(aspect_ratios)). Per-record random streams: a
        record does not depend on which others are rendered with it."""
        height, width = self._shapes[int(indices[0]) % len(self._shapes)]
        rngs = [np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], int(index)]) for index in indices]
        return render_block(self._combinations[indices], height, rngs, width=width)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"Demo record {index} is out of range for a split of {self.size}.")
        attributes = ATTRIBUTE_COMBINATIONS[self._combinations[index]]
        return {"image": self._image(index), "captions": captions_for(attributes), "id": f"demo-{self.split}-{index}"}

    def __getstate__(self) -> dict:
        # Worker processes render their own copy rather than receive it through a pipe.
        return {**self.__dict__, "_images": None, "_rendered": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        ratios = "" if self.aspect_ratios == (1.0,) else f", aspect_ratios={self.aspect_ratios}"
        return f"DemoSource(split={self.split!r}, size={self.size}, image_size={self.image_size}, seed={self.seed}{ratios})"
