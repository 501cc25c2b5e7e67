"""Fitting a loaded checkpoint's parameters to a freshly initialised model (`init_from`): arrays of equal
shape are copied, the image position embedding is resampled bilinearly to a new patch grid (as
big_vision's `resample_posemb`, for fine-tuning at another resolution), the text position embedding is
truncated or extended (new rows keep their fresh values), and parameters matching `init_skip` regexes keep
their fresh initialisation. Pure functions on nested dicts; every decision is returned as a note."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

IMAGE_POSEMB = "img/pos_embedding"
TEXT_POSEMB = "txt/pos_embedding"


def linear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] linear interpolation with the end points aligned (scipy.ndimage.zoom order=1)."""
    weights = np.zeros((size_out, size_in), np.float64)
    if size_in == 1 or size_out == 1:
        weights[:, 0] = 1.0  # a single sample on either side: the first input
        return weights
    coords = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.minimum(np.floor(coords).astype(int), size_in - 2)
    frac = coords - low
    weights[np.arange(size_out), low] = 1.0 - frac
    weights[np.arange(size_out), low + 1] += frac
    return weights


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """[1, h*w, width] position embedding on an h x w patch grid -> [1, H*W, width] on `new_grid` (H, W),
    bilinear with the corner embeddings kept. `old_grid` defaults to the square root of the token count."""
    # numpy in float64 for loading checkpoints; a jax array (inside a jitted step: ViT at another grid) in its dtype
    xp = jnp if isinstance(posemb, jax.Array) else np
    posemb = posemb if xp is jnp else np.asarray(posemb)
    tokens = posemb.shape[1]
    if old_grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"Position embedding of {tokens} tokens is not a square grid; pass old_grid=(h, w).")
        old_grid = (side, side)
    dtype = np.float64 if xp is np else posemb.dtype
    grid = posemb.reshape(old_grid[0], old_grid[1], -1).astype(dtype)
    rows, cols = (linear_weights(old, new).astype(dtype) for old, new in zip(old_grid, new_grid))
    resampled = xp.einsum("Hh,Ww,hwd->HWd", rows, cols, grid)
    return resampled.reshape(1, new_grid[0] * new_grid[1], -1).astype(posemb.dtype)


def resize_text_posemb(loaded: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """[1, L, width] -> [1, L', width]: the first L' rows when shorter; all L rows then the fresh rows when
    longer (positions the checkpoint never saw start from the new model's initialisation)."""
    loaded, fresh = np.asarray(loaded), np.asarray(fresh)
    length = fresh.shape[1]
    if loaded.shape[1] >= length:
        return loaded[:, :length]
    return np.concatenate([loaded, fresh[:, loaded.shape[1]:].astype(loaded.dtype)], axis=1)


def fit_params(loaded: dict, fresh: dict, skip: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """(params shaped as `fresh`, notes): for each parameter path of `fresh` in `groups` (all when empty),
    the loaded array, resampled/resized position embeddings, or the fresh one where a `skip` regex fully
    matches the path. Raises ValueError listing every array that cannot be mapped with both shapes and the
    option that would fix it, and a skip regex that matches nothing with the paths it could match."""
    mine = traverse_util.flatten_dict(fresh, sep="/")
    theirs = traverse_util.flatten_dict(loaded, sep="/")
    selected = [path for path in mine if not groups or path.split("/")[0] in groups]
    for pattern in skip:
        if not any(re.fullmatch(pattern, path) for path in selected):
            raise ValueError(f"init_skip regex {pattern!r} matches no parameter path (it must match a whole path). "
                             f"Parameter paths: {', '.join(selected[:12])}{', ...' if len(selected) > 12 else ''}.")
    out, notes, problems = dict(mine), [], []
    for path in selected:
        shape = tuple(np.shape(mine[path]))
        if any(re.fullmatch(pattern, path) for pattern in skip):
            notes.append(f"{path}: kept the fresh initialisation (init_skip)")
            continue
        if path not in theirs:
            problems.append(f"{path} {shape}: missing in the checkpoint; add it to init_skip to keep its fresh init")
            continue
        value = np.asarray(theirs[path])
        if value.shape == shape:
            out[path] = value
        elif path == IMAGE_POSEMB and value.ndim == 3 and math.isqrt(value.shape[1]) ** 2 != value.shape[1]:
            problems.append(f"{path}: {value.shape} in the checkpoint is no square grid of positions "
                            f"({value.shape[1]} is not a square), so it cannot be resized to {shape}; add it to "
                            "init_skip to keep its fresh init, or set the model config to the checkpoint's shape")
        elif path == IMAGE_POSEMB and value.ndim == 3 and value.shape[2] == shape[2]:
            new_side = math.isqrt(shape[1])
            out[path] = resample_posemb(value, (new_side, new_side))
            notes.append(f"{path}: resampled bilinearly from {value.shape} to {shape}")
        elif path == TEXT_POSEMB and value.ndim == 3 and value.shape[2] == shape[2]:
            out[path] = resize_text_posemb(value, mine[path])
            action = "truncated" if value.shape[1] > shape[1] else "extended with fresh rows"
            notes.append(f"{path}: {action} from {value.shape} to {shape}")
        else:
            problems.append(f"{path}: {value.shape} in the checkpoint, {shape} here; add it to init_skip to keep "
                            "its fresh init, or set the model config to the checkpoint's shape")
    if problems:
        raise ValueError("The checkpoint's arrays do not fit this model:\n  " + "\n  ".join(problems[:30]))
    return traverse_util.unflatten_dict(out, sep="/"), notes
