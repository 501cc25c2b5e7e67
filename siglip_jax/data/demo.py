"""The demo dataset: coloured shapes on a dark background with captions naming colour, shape, size and
position, rendered on the fly. Seeded and deterministic: record i of a split is always the same image,
and the splits draw from disjoint seed streams, so the eval split is held out. Nothing is downloaded.
"""
from __future__ import annotations

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


def _shape_mask(shape: str, rows: np.ndarray, cols: np.ndarray, half: float) -> np.ndarray:
    """Pixels inside a shape centred at the origin; rows/cols are pixel offsets from the centre."""
    if shape == "circle":
        return rows**2 + cols**2 <= half**2
    if shape == "square":
        return (np.abs(rows) <= half * 0.85) & (np.abs(cols) <= half * 0.85)
    if shape == "triangle":  # apex up: the half-width grows linearly from the top to the base
        return (rows >= -half) & (rows <= half) & (np.abs(cols) <= (rows + half) / 2)
    if shape == "cross":
        arm = half * 0.35
        inside = (np.abs(rows) <= half) & (np.abs(cols) <= half)
        return inside & ((np.abs(rows) <= arm) | (np.abs(cols) <= arm))
    raise ValueError(f"Unknown shape {shape!r}; valid: {', '.join(SHAPES)}.")


def render(attributes: dict[str, str], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A [image_size, image_size, 3] uint8 image of one shape with the given attributes."""
    background = rng.integers(10, 60, size=3)
    image = np.broadcast_to(background, (image_size, image_size, 3)).astype(np.float32)
    image = image + rng.normal(0, 6, size=image.shape)  # texture, so pixels are never trivially constant
    cell = image_size / 3
    row, col = POSITIONS[attributes["position"]]
    jitter = rng.uniform(-0.12, 0.12, size=2) * cell
    centre_row = (row + 0.5) * cell + jitter[0]
    centre_col = (col + 0.5) * cell + jitter[1]
    half = SIZES[attributes["size"]] * image_size * rng.uniform(0.9, 1.1)
    grid_rows, grid_cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    mask = _shape_mask(attributes["shape"], grid_rows - centre_row, grid_cols - centre_col, half)
    colour = np.array(COLOURS[attributes["colour"]], np.float32) * rng.uniform(0.85, 1.0)
    image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8)


def captions_for(attributes: dict[str, str]) -> list[str]:
    return [template.format(**attributes) for template in TEMPLATES]


class DemoSource:
    """A grain random-access source: record i -> {"image": uint8 [s, s, 3], "captions": 5 strings, "id"}."""

    def __init__(self, split: str = "train", size: int = 50_000, image_size: int = 32, seed: int = 0):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"Unknown demo split {split!r}; valid: {', '.join(SPLIT_SEEDS)}.")
        if size <= 0:
            raise ValueError(f"Demo split size must be positive, got {size}.")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"Demo record {index} is out of range for a split of {self.size}.")
        rng = np.random.default_rng([self.seed, SPLIT_SEEDS[self.split], index])
        attributes = {
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "size": list(SIZES)[rng.integers(len(SIZES))],
            "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        }
        return {
            "image": render(attributes, self.image_size, rng),
            "captions": captions_for(attributes),
            "id": f"demo-{self.split}-{index}",
        }

    def __repr__(self) -> str:
        return f"DemoSource(split={self.split!r}, size={self.size}, image_size={self.image_size}, seed={self.seed})"
