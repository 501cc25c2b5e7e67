"""Queries scored against a gallery in blocks on device: the input checks, block sizes and two
kernels, the rank of each query's correct items and top-k search.

Ranks follow the pessimistic tie rule of retrieval.py: rank = 1 + #{wrong items with score >= best
correct score}, a count that needs no sort.

Scale: the rank of the correct item is found by counting the scores that beat it, one block of
queries at a time, so memory is O(block_size x gallery) scores on device and O(N + M) ranks on the
host; the N x M matrix is never built. `top_k_search` also blocks the gallery, so its memory is
O(block_size x gallery_block_size) and a gallery of 1M items fits.
"""
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.models import two_towers

# Auto block size keeps one block of float32 scores under 256 MiB.
_MAX_SCORE_BLOCK_ELEMENTS = 2**26
_MAX_AUTO_BLOCK_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# Input checks shared with classification.py
# ---------------------------------------------------------------------------------------------
def check_embeddings(name: str, embeddings) -> None:
    """Raises ValueError unless `embeddings` is a non-empty floating [num_items, width] array."""
    shape = getattr(embeddings, "shape", None)
    dtype = getattr(embeddings, "dtype", None)
    if shape is None or len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array [num_items, width]; got shape {shape}. "
            "Stack the per-item embeddings into one numpy or jax array first.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must have a floating dtype (float32, bfloat16, float16); got {dtype}. "
            "Pass the embeddings the model returns, not token ids or labels.")


def check_same_width(name_a: str, a, name_b: str, b) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has width {a.shape[1]} but {name_b} has width {b.shape[1]}; both towers must "
            "project to the same embedding width. Check that both come from the same model.")


def check_index_array(name: str, indices, length: int, num_targets: int, target_name: str) -> np.ndarray:
    """Returns `indices` as int32 numpy after checking shape [length] and range [0, num_targets)."""
    indices = np.asarray(indices)
    if indices.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), one entry per row; got {indices.shape}.")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices into {target_name}; got dtype {indices.dtype}.")
    bad = np.flatnonzero((indices < 0) | (indices >= num_targets))
    if bad.size:
        raise ValueError(
            f"{name} must lie in [0, {num_targets}) to index {target_name}; entry {bad[0]} is "
            f"{indices[bad[0]]} ({bad.size} entries out of range). Re-number them from 0.")
    return indices.astype(np.int32)


def auto_block_size(gallery_size: int) -> int:
    """Query rows per block so that one block of float32 scores stays under 256 MiB."""
    rows = _MAX_SCORE_BLOCK_ELEMENTS // max(gallery_size, 1)
    return int(max(1, min(_MAX_AUTO_BLOCK_SIZE, rows)))


def balanced_block_size(num_rows: int, max_block_size: int) -> int:
    """The smallest block that covers num_rows in as few blocks as max_block_size does.

    1,000 queries in blocks of at most 671 become 2 blocks of 500 rather than 671 + 329 padded to
    671, so the padding that buys a single compile wastes at most one row per block.
    """
    num_blocks = math.ceil(num_rows / max_block_size)
    return math.ceil(num_rows / num_blocks)


def _check_block_size(name: str, block_size: int) -> int:
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"{name} must be a positive integer; got {block_size!r}.")
    return int(block_size)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers like (1, 5, 10); got {ks!r}.")
    return tuple(int(k) for k in ks)


def l2_normalize(embeddings: jax.Array) -> jax.Array:
    """[n, width] -> [n, width] rows of unit length, in the input dtype; zero rows stay zero, so they rank
    last rather than poisoning counts (two_towers.l2_normalize)."""
    return two_towers.l2_normalize(embeddings).astype(embeddings.dtype)


def to_device(embeddings) -> jax.Array:
    """Puts host embeddings on the default device once; device arrays pass through untouched.

    jax.device_put costs one copy; jnp.asarray of a numpy array briefly holds two, 6 GiB more
    at the peak for a 1M x 768 float32 gallery.
    """
    if isinstance(embeddings, jax.Array):
        return embeddings
    embeddings = np.asarray(embeddings)
    if embeddings.dtype == np.float64:  # JAX computes in float32 unless x64 is enabled
        embeddings = embeddings.astype(np.float32)
    return jax.device_put(embeddings)


@jax.jit
def _inverse_norms(embeddings: jax.Array) -> jax.Array:
    """[n, width] -> [n] float32 1 / |row|; an all-zero row gets a huge factor times a zero score."""
    norms = jnp.linalg.norm(embeddings.astype(jnp.float32), axis=-1)
    return 1.0 / jnp.maximum(norms, two_towers.NORM_FLOOR)


def _gallery_scales(gallery: jax.Array, normalize: bool) -> jax.Array:
    # Cosine similarity as (query . item) / |item|: scaling the scores, not the gallery, avoids a
    # normalised copy of the gallery (3 GiB at 1M x 768 float32).
    if normalize:
        return _inverse_norms(gallery)
    return jnp.ones((gallery.shape[0],), jnp.float32)


@jax.jit
def _all_finite(embeddings: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(embeddings))


def _raise_if_not_finite(name: str, all_finite) -> None:
    if not bool(all_finite):
        raise ValueError(
            f"{name} contains NaN or inf. Comparisons with NaN are false, so every NaN query would "
            "count as rank 1 and inflate recall; fix the model outputs (e.g. a diverged checkpoint).")


def _pad_rows(block, num_rows: int):
    """Pads a [rows, ...] host or device block with zero rows up to num_rows."""
    missing = num_rows - block.shape[0]
    if missing == 0:
        return block
    widths = [(0, missing)] + [(0, 0)] * (block.ndim - 1)
    return jnp.pad(block, widths) if isinstance(block, jax.Array) else np.pad(block, widths)


# ---------------------------------------------------------------------------------------------
# Ranks of the correct items
# ---------------------------------------------------------------------------------------------
@jax.jit
def _block_positive_ranks(query_block, query_targets, gallery, gallery_scales, gallery_owners):
    """Pessimistic 1-based rank of each query's best correct gallery item.

    Args:
      query_block: [block, width] queries (already normalised if wanted).
      query_targets: [block] int, the id each query is looking for.
      gallery: [gallery_size, width].
      gallery_scales: [gallery_size] float32 factor per item's score (1 / |item| for cosine).
      gallery_owners: [gallery_size] int, the id each gallery item belongs to; item g is correct for
        query q when gallery_owners[g] == query_targets[q].
    Returns:
      ranks: [block] int32, and whether the query block was all finite (a scalar bool).
    """
    scores = jnp.einsum("qd,gd->qg", query_block, gallery, preferred_element_type=jnp.float32)
    scores = scores * gallery_scales[None, :]
    is_correct = gallery_owners[None, :] == query_targets[:, None]
    # Taking the correct score from the same matmul as the others keeps exact ties exact.
    best_correct = jnp.max(jnp.where(is_correct, scores, -jnp.inf), axis=1, keepdims=True)
    beats_or_ties = jnp.logical_and(jnp.logical_not(is_correct), scores >= best_correct)
    ranks = 1 + jnp.sum(beats_or_ties, axis=1, dtype=jnp.int32)
    return ranks, jnp.all(jnp.isfinite(query_block))


@jax.jit
def _normalize_on_device(embeddings):
    return l2_normalize(embeddings)


def positive_ranks(query_embeddings, query_targets, gallery_embeddings, gallery_owners,
                   block_size: int | None = None, normalize: bool = True,
                   query_name: str = "query_embeddings",
                   gallery_name: str = "gallery_embeddings") -> np.ndarray:
    """Pessimistic rank of each query's best correct gallery item, one query block at a time.

    Args:
      query_embeddings: [num_queries, width] host (numpy) or device array; sent to device per block.
      query_targets: [num_queries] int, the id each query looks for.
      gallery_embeddings: [gallery_size, width], placed on device whole.
      gallery_owners: [gallery_size] int, the id of each gallery item. Every query should have at
        least one gallery item with its id (callers check this with a message for their setting).
      block_size: most queries per block; None picks one keeping a block of scores under 256 MiB.
        Blocks are evened out and the last one zero-padded, so every block has one shape and
        compiles once.
      normalize: L2-normalise both sides first (cosine similarity).
    Returns:
      ranks: [num_queries] int32, 1-based; ties count against the query.
    """
    check_embeddings(query_name, query_embeddings)
    check_embeddings(gallery_name, gallery_embeddings)
    check_same_width(query_name, query_embeddings, gallery_name, gallery_embeddings)
    num_queries = query_embeddings.shape[0]
    if np.shape(query_targets) != (num_queries,) or np.shape(gallery_owners) != (gallery_embeddings.shape[0],):
        raise ValueError(
            f"query_targets must have shape ({num_queries},) and gallery_owners shape "
            f"({gallery_embeddings.shape[0]},), one id per row; got {np.shape(query_targets)} and "
            f"{np.shape(gallery_owners)}.")
    block_size = auto_block_size(gallery_embeddings.shape[0]) if block_size is None else block_size
    block_size = balanced_block_size(num_queries, _check_block_size("block_size", block_size))
    gallery = to_device(gallery_embeddings)
    _raise_if_not_finite(gallery_name, _all_finite(gallery))
    gallery_scales = _gallery_scales(gallery, normalize)
    gallery_owners = jnp.asarray(gallery_owners, dtype=jnp.int32)
    query_targets = np.asarray(query_targets, dtype=np.int32)

    block_ranks, block_finite = [], []
    for start in range(0, num_queries, block_size):
        queries = _pad_rows(query_embeddings[start:start + block_size], block_size)
        targets = _pad_rows(query_targets[start:start + block_size], block_size)
        queries = jnp.asarray(queries, dtype=gallery.dtype)
        if normalize:
            queries = _normalize_on_device(queries)
        ranks, finite = _block_positive_ranks(queries, targets, gallery, gallery_scales, gallery_owners)
        block_ranks.append(ranks)
        block_finite.append(finite)
    # Reading results only after every block is dispatched lets the device run ahead of the host.
    _raise_if_not_finite(query_name, all(bool(f) for f in block_finite))
    return np.concatenate([np.asarray(r) for r in block_ranks])[:num_queries]


# ---------------------------------------------------------------------------------------------
# Top-k search
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k", "gallery_block_size"))
def _block_top_k(query_block, gallery, gallery_scales, k, gallery_block_size):
    """[block, width] queries x [gallery_size, width] -> (scores [block, k] f32, indices [block, k] i32).

    Walks the gallery in blocks, merging each block's top k into a running top k, so memory is
    O(block x gallery_block_size) whatever the gallery size.
    """
    gallery_size = gallery.shape[0]
    num_gallery_blocks = math.ceil(gallery_size / gallery_block_size)
    num_queries = query_block.shape[0]

    def merge_block(best, block_number):
        best_scores, best_indices = best
        intended_start = block_number * gallery_block_size
        # The last block is slid back to stay in bounds instead of padding (a copy of the gallery);
        # rows it shares with the previous block are masked so none is counted twice.
        start = jnp.minimum(intended_start, gallery_size - gallery_block_size)
        block = jax.lax.dynamic_slice_in_dim(gallery, start, gallery_block_size)
        scales = jax.lax.dynamic_slice_in_dim(gallery_scales, start, gallery_block_size)
        scores = jnp.einsum("qd,gd->qg", query_block, block, preferred_element_type=jnp.float32)
        scores = scores * scales[None, :]
        indices = start + jnp.arange(gallery_block_size, dtype=jnp.int32)
        scores = jnp.where(indices[None, :] >= intended_start, scores, -jnp.inf)
        block_scores, block_positions = jax.lax.top_k(scores, k)
        # Running candidates go first: they have lower gallery indices, and top_k puts the lower
        # position first among equal scores, so ties resolve to the lower gallery index.
        merged_scores = jnp.concatenate([best_scores, block_scores], axis=1)
        merged_indices = jnp.concatenate([best_indices, indices[block_positions]], axis=1)
        top_scores, top_positions = jax.lax.top_k(merged_scores, k)
        return (top_scores, jnp.take_along_axis(merged_indices, top_positions, axis=1)), None

    initial = (jnp.full((num_queries, k), -jnp.inf, jnp.float32),
               jnp.full((num_queries, k), -1, jnp.int32))
    (scores, indices), _ = jax.lax.scan(merge_block, initial, jnp.arange(num_gallery_blocks))
    return scores, indices, jnp.all(jnp.isfinite(query_block))


def top_k_search(query_embeddings, gallery_embeddings, k: int, block_size: int = 256,
                 gallery_block_size: int = 65536, normalize: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery items for each query, best first; equal scores go lower index first.

    Args:
      query_embeddings: [num_queries, width], host or device; sent to device per block.
      gallery_embeddings: [gallery_size, width], placed on device whole (float32 or bfloat16).
      k: results per query, 1 <= k <= gallery_size.
      block_size: most queries per block (evened out, last one zero-padded: one compile).
      gallery_block_size: gallery rows scored at a time; raised to k if smaller.
      normalize: cosine similarity (True) or raw dot product (False).
    Returns:
      scores: [num_queries, k] float32, descending.
      indices: [num_queries, k] int32 into gallery_embeddings.
    """
    check_embeddings("query_embeddings", query_embeddings)
    check_embeddings("gallery_embeddings", gallery_embeddings)
    check_same_width("query_embeddings", query_embeddings, "gallery_embeddings", gallery_embeddings)
    gallery_size, num_queries = gallery_embeddings.shape[0], query_embeddings.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= gallery_size:
        raise ValueError(f"k must be an integer in [1, {gallery_size}] (the gallery size); got {k!r}.")
    block_size = balanced_block_size(num_queries, _check_block_size("block_size", block_size))
    gallery_block_size = _check_block_size("gallery_block_size", gallery_block_size)
    gallery_block_size = min(max(gallery_block_size, int(k)), gallery_size)

    gallery = to_device(gallery_embeddings)
    _raise_if_not_finite("gallery_embeddings", _all_finite(gallery))
    gallery_scales = _gallery_scales(gallery, normalize)
    block_results = []
    for start in range(0, num_queries, block_size):
        queries = jnp.asarray(_pad_rows(query_embeddings[start:start + block_size], block_size),
                              dtype=gallery.dtype)
        if normalize:
            queries = _normalize_on_device(queries)
        block_results.append(_block_top_k(queries, gallery, gallery_scales, int(k), gallery_block_size))
    _raise_if_not_finite("query_embeddings", all(bool(finite) for _, _, finite in block_results))
    scores = np.concatenate([np.asarray(s) for s, _, _ in block_results])[:num_queries]
    indices = np.concatenate([np.asarray(i) for _, i, _ in block_results])[:num_queries]
    return scores, indices
