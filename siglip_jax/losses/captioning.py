"""The caption decoder's loss (SigLIP 2's LocCa task): token cross-entropy over each caption's real tokens,
with the vocabulary logits computed a chunk of positions at a time. Pure functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def caption_weights(token_ids: jax.Array, eos_id: int) -> jax.Array:
    """[batch, length] float32: 1 at every position up to and including the caption's first EOS (the decoder
    learns to end a caption), 0 on the padding after it. A caption with no EOS counts whole."""
    is_eos = (token_ids == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (eos_before == 0).astype(jnp.float32)


def _chunk_loss_sum(hidden: jax.Array, head_kernel: jax.Array, head_bias: jax.Array, targets: jax.Array,
                    weights: jax.Array) -> jax.Array:
    """Weighted sum of the cross-entropy of [batch, chunk] positions; logits [batch, chunk, vocab] in float32."""
    logits = jnp.einsum("bcw,wv->bcv", hidden, head_kernel.astype(hidden.dtype)).astype(jnp.float32)
    logits = logits + head_bias.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logits) * weights)


def caption_loss(hidden: jax.Array, head_kernel: jax.Array, head_bias: jax.Array, token_ids: jax.Array,
                 eos_id: int, *, chunk_size: int = 0) -> jax.Array:
    """Mean cross-entropy per caption token (padding ignored) of the decoder's predictions.

    hidden [batch, length, width] (CaptionDecoder's output), head [width, vocab] + [vocab], token_ids [batch,
    length] the targets: position i predicts token i. With `chunk_size` > 0 (a divisor of the length) the
    logits of `chunk_size` positions exist at a time, forward and backward (each chunk is rematerialised in
    the backward pass), so memory holds [batch, chunk_size, vocab] logits instead of [batch, length, vocab]."""
    batch, length, width = hidden.shape
    weights = caption_weights(token_ids, eos_id)
    if not chunk_size or chunk_size >= length:
        total = _chunk_loss_sum(hidden, head_kernel, head_bias, token_ids, weights)
    else:
        if length % chunk_size:
            raise ValueError(f"model.decoder.logits_chunk={chunk_size} does not divide the caption length {length}; "
                             "pick a divisor of model.text.max_len (or 0 for no chunking).")
        num_chunks = length // chunk_size

        def by_chunk(x: jax.Array) -> jax.Array:  # [batch, length, ...] -> [chunks, batch, chunk, ...]
            return jnp.swapaxes(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 0, 1)

        chunk_loss = jax.checkpoint(_chunk_loss_sum)

        def add_chunk(total: jax.Array, chunk: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            chunk_hidden, chunk_targets, chunk_weights = chunk
            return total + chunk_loss(chunk_hidden, head_kernel, head_bias, chunk_targets, chunk_weights), None

        total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32),
                                (by_chunk(hidden), by_chunk(token_ids), by_chunk(weights)))
    return total / jnp.maximum(jnp.sum(weights), 1.0)
