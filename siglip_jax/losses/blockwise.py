"""The blockwise loss sum behind every `losses.contrastive_loss` variant: a shard's query rows
scored against all key rows, one block (or chunk) of keys at a time.

How the keys reach a shard is its `Layout`: the gathered batch at once (`all_gather`, and the
unsharded case), a ring of `jax.lax.ppermute` hops (`ring`), or all-gathered chunks (`chunked`).
A ring block is forwarded in pieces, each arriving piece written over the one that left, so a
stream holds one block (plus its gradient in the backward pass) whatever the number of devices.

Autodiff through a ring loop would save every hop's block for the backward pass (memory growing
with the number of devices), so the sum has a custom VJP: the backward pass runs the ring again,
recomputing each logits chunk and sending the key gradients around with the keys.

Memory also depends on the order XLA runs things in, which data dependencies alone fix here
(`_in_turn`): in-place writes after the reads they overwrite, the backward after the forward, one
softmax direction after the other. `bench/loss_memory.py` measures the result.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST  # f32 matmuls on TPU/GPU, so all variants agree to 1e-5


# ------------------------------------------------------------------------ one block of the logits
def _block_forward(name, queries, keys, scale, bias, row_ids, column_ids, row_lse):
    """Scores queries [rows, embed] against one key block [columns, embed].

    Returns (this block's loss sum [], row_lse [rows] updated with this block's columns); the
    running logsumexp is only used by softmax (for sigmoid it passes through).
    """
    logits = scale * jnp.matmul(queries, keys.T, precision=PRECISION) + bias
    positive = row_ids[:, None] == column_ids[None, :]
    if name == "sigmoid":
        labels = jnp.where(positive, 1.0, -1.0)
        return jnp.sum(jax.nn.softplus(-labels * logits)), row_lse
    # softmax: the logsumexp is added per row once all blocks are seen; here only the positives.
    loss = -jnp.sum(jnp.where(positive, logits, 0.0))
    return loss, jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))


def _block_backward(name, queries, keys, scale, bias, row_ids, column_ids, row_lse, cotangent):
    """Gradient of the block's share of the loss sum: (d_queries, d_keys, d_scale, d_bias)."""
    dots = jnp.matmul(queries, keys.T, precision=PRECISION)
    logits = scale * dots + bias
    positive = row_ids[:, None] == column_ids[None, :]
    if name == "sigmoid":
        labels = jnp.where(positive, 1.0, -1.0)
        d_logits = -labels * jax.nn.sigmoid(-labels * logits)  # d softplus(-z l) / dl
    else:
        d_logits = jnp.exp(logits - row_lse[:, None]) - positive  # softmax minus one-hot
    d_logits = cotangent * d_logits
    d_queries = scale * jnp.matmul(d_logits, keys, precision=PRECISION)
    d_keys = scale * jnp.matmul(d_logits.T, queries, precision=PRECISION)
    return d_queries, d_keys, jnp.sum(d_logits * dots), jnp.sum(d_logits)


# ------------------------------------------------------------------ rows against all key blocks
class Layout(NamedTuple):
    """Static description of how keys reach a device (hashable: it is a custom_vjp nondiff arg)."""
    name: str
    axes: tuple            # mesh axes the batch is sharded over (present ones only); () unsharded
    num_shards: int        # product of their sizes
    implementation: str    # one of config.LOSS_IMPLEMENTATIONS
    chunk_size: int        # keys scored at once; 0 means a whole block


def _shard_index(layout):
    return jax.lax.axis_index(layout.axes) if layout.axes else 0


def per_shard(layout, value):
    """A fresh constant typed as varying per shard, as carries of per-shard loops must be."""
    return jax.lax.pcast(value, layout.axes, to="varying") if layout.axes else value


def _in_turn(value, previous_result):
    """`value`, made to depend on a scalar computed earlier, so XLA cannot start with it sooner.

    Orders what data alone does not: in-place writes after the reads they overwrite, the
    backward pass after the forward, one softmax direction after the other. isfinite makes the
    added term exactly 0 even when previous_result is inf or NaN; XLA does not fold 0 * x for
    floats, so the dependency survives (optimization barriers do not on every backend). It costs
    one pass over `value`, so it is applied to chunks, pieces and scalars where it can be.
    """
    return value + 0.0 * jnp.isfinite(previous_result).astype(value.dtype)


def _send(layout, x, shift):
    """Sends x (an array or a tuple of them) from shard i to shard i + shift, mod num_shards."""
    n = layout.num_shards
    return jax.lax.ppermute(x, layout.axes, perm=[(i, (i + shift) % n) for i in range(n)])


def _ring_hops(layout):
    """How many hops the stream of key blocks travels, each to the next shard: n - 1 for a ring."""
    return layout.num_shards - 1 if layout.implementation == "ring" else 0


def _ring_schedule(layout):
    """Hops 1, 2, ... grouped into runs that each become one loop: [(first_hop, last_hop, forwards)].
    Every hop scores the block it holds; all but the last then forward it."""
    hops = _ring_hops(layout)
    runs = [(1, hops - 1, True)] if hops > 1 else []
    return runs + [(hops, hops, False)] if hops else runs


def _run_hops(first, last, one_hop, state):
    """Applies one_hop(hop, state) for hop = first..last; a loop, so the program size is O(1)."""
    if first == last:
        return one_hop(first, state)
    return jax.lax.fori_loop(first, last + 1, one_hop, state)


def _column_ids(layout, block_rows, start, size, hop, own):
    """Global batch indices of keys [start, start + size) of the block scored at `hop` (`own`: hop 0,
    this shard's own block, or the whole gathered batch)."""
    if own:
        owner = 0 if layout.implementation == "all_gather" else _shard_index(layout)
    else:
        owner = (_shard_index(layout) - hop) % layout.num_shards
    return owner * block_rows + start + jnp.arange(size)


def _gathered_chunk(layout, keys, index):
    """Chunk `index` of the `chunked` implementation: rows [start, start + step) of every shard's
    keys, all-gathered ([chunk_size, embed]), their global batch indices, and start."""
    step = layout.chunk_size // layout.num_shards  # each shard's share of a chunk
    start = index * step
    chunk = jax.lax.all_gather(_slice(keys, start, step), layout.axes, tiled=True)
    shards = jnp.arange(layout.num_shards)[:, None] * keys.shape[0]
    return chunk, (shards + start + jnp.arange(step)[None, :]).reshape(-1), start


def _slice(block, start, size):
    return jax.lax.dynamic_slice_in_dim(block, start, size)


def _put(block, update, start):
    return jax.lax.dynamic_update_slice_in_dim(block, update, start, 0)


def _forward_rows(layout, buffers, start, size, piece, after):
    """Sends rows [start, start + size) of each buffer (a tuple) to the next shard,
    `piece` rows at a time, each arriving piece written over the rows that just left.

    So a stream holds one block in flight, not the block leaving plus the one arriving. The writes
    wait for `after` (a result of scoring these rows): otherwise XLA cannot order the scoring's
    reads before the in-place writes and copies the whole buffer instead.
    """
    def one_piece(index, buffers):
        at = start + index * piece
        arriving = _send(layout, tuple(_slice(b, at, piece) for b in buffers), 1)
        return tuple(_put(b, _in_turn(a, after), at) for b, a in zip(buffers, arriving))
    if size == piece:
        return one_piece(0, buffers)
    return jax.lax.fori_loop(0, size // piece, one_piece, buffers)


def _piece_rows(block_rows, chunk):
    """Rows sent per ppermute: a chunk, or an eighth of an unchunked block (a divisor of it)."""
    if chunk < block_rows:
        return chunk
    return max(d for d in range(1, -(-block_rows // 8) + 1) if block_rows % d == 0)


def _ring_pass(layout, keys, carry, after, visit, written_after, extras=lambda: ()):
    """Runs the stream of key blocks past this shard's queries, chunk by chunk: (carry, stream).

    The stream is a tuple of [block_rows, ...] buffers: the keys, then `extras()` (the backward's key
    gradient, which travels with them). It starts as a copy of the own block (hop 0), is scored, then
    forwarded to the next shard, run by run of the hop schedule; without a ring it is hop 0 alone, the
    keys already holding everything.
    visit(carry, key_chunk, column_ids, stream, start) -> (carry, stream) scores one chunk.
    written_after(carry) is the scalar that the in-place writes of forwarded rows wait for.
    """
    block_rows = keys.shape[0]
    chunk = layout.chunk_size or block_rows
    piece = _piece_rows(block_rows, chunk)

    def one_hop(hop, state, forwards, own=False):
        def chunk_step(index, state):
            carry, stream = state
            start = index * chunk
            carry, stream = visit(carry, _slice(stream[0], start, chunk),
                                  _column_ids(layout, block_rows, start, chunk, hop, own), stream, start)
            if forwards:
                sent = _forward_rows(layout, stream, start, chunk, piece, written_after(carry))
                stream = sent + stream[len(sent):]
            return carry, stream
        return jax.lax.fori_loop(0, block_rows // chunk, chunk_step, state)

    # The stream is a fresh copy of the keys in any case; making it wait costs nothing more.
    stream = (_in_turn(keys, after) if _ring_hops(layout) else keys, *extras())
    state = one_hop(0, (carry, stream), forwards=bool(_ring_hops(layout)), own=True)
    for first, last, forwards in _ring_schedule(layout):
        state = _run_hops(first, last, functools.partial(one_hop, forwards=forwards), state)
    return state


def _blocks_forward(layout, queries, keys, scale, bias, after):
    """Loss sum of this shard's queries against every key, and their row logsumexp [rows].

    `keys` is this shard's block ([global_batch, embed] already gathered for all_gather). Each ring
    stream starts as a copy of the own block and is scored, then forwarded, chunk by chunk.
    """
    rows, block_rows = queries.shape[0], keys.shape[0]
    row_ids = _shard_index(layout) * rows + jnp.arange(rows)
    loss, row_lse = per_shard(layout, (jnp.zeros(()), jnp.full((rows,), -jnp.inf)))
    carry = (_in_turn(loss, after), row_lse)

    def score(carry, chunk, column_ids):
        loss, row_lse = carry
        chunk_loss, row_lse = _block_forward(layout.name, queries, chunk, scale, bias, row_ids,
                                             column_ids, row_lse)
        return loss + chunk_loss, row_lse

    if layout.implementation == "chunked" and layout.axes:
        def gathered_chunk(index, carry):
            chunk, column_ids, _ = _gathered_chunk(layout, keys, index)
            return score(carry, chunk, column_ids)
        loss, row_lse = jax.lax.fori_loop(
            0, block_rows * layout.num_shards // layout.chunk_size, gathered_chunk, carry)
    else:
        def visit(carry, key_chunk, column_ids, stream, start):
            return score(carry, key_chunk, column_ids), stream
        (loss, row_lse), _ = _ring_pass(layout, keys, carry, after, visit, written_after=lambda carry: carry[0])
    if layout.name == "softmax":
        loss = loss + jnp.sum(row_lse)
    return loss, row_lse


def _blocks_backward(layout, queries, keys, scale, bias, row_lse, forward_loss, cotangent):
    """Scores the keys against the queries again. Each key chunk's gradient travels with it and is
    sent home when the stream has been everywhere; d_queries, d_scale and d_bias stay local."""
    rows, block_rows = queries.shape[0], keys.shape[0]
    row_ids = _shard_index(layout) * rows + jnp.arange(rows)
    d_queries, d_scale, d_bias = per_shard(layout, (jnp.zeros(queries.shape), jnp.zeros(()),
                                                     jnp.zeros(())))
    # The sigmoid backward needs nothing the forward computed, so XLA could interleave the two and
    # hold both passes' blocks at once: the backward's scalar chain starts from the forward loss,
    # and so do the ring streams below.
    grads = (d_queries, _in_turn(d_scale, forward_loss), d_bias)

    def gradients(grads, chunk, column_ids):
        """(grads plus this chunk's share of d_queries, d_scale, d_bias; the chunk's d_keys)."""
        d_queries, d_scale, d_bias = grads
        dq, dk, ds, db = _block_backward(layout.name, queries, chunk, scale, bias, row_ids,
                                         column_ids, row_lse, cotangent)
        return (d_queries + dq, d_scale + ds, d_bias + db), dk

    zeros = lambda: per_shard(layout, jnp.zeros(keys.shape))  # noqa: E731
    if layout.implementation == "chunked" and layout.axes:
        def gathered_chunk(index, state):
            grads, d_keys = state
            chunk, column_ids, start = _gathered_chunk(layout, keys, index)
            grads, dk = gradients(grads, chunk, column_ids)
            # Each shard's gradient for the gathered chunk, summed and split back to the owners.
            d_own = jax.lax.psum_scatter(dk, layout.axes, scatter_dimension=0, tiled=True)
            return grads, _put(d_keys, d_own, start)
        (d_queries, d_scale, d_bias), d_keys = jax.lax.fori_loop(
            0, block_rows * layout.num_shards // layout.chunk_size, gathered_chunk,
            (grads, zeros()))
        return d_queries, d_keys, d_scale, d_bias

    def visit(grads, key_chunk, column_ids, stream, start):
        grads, dk = gradients(grads, key_chunk, column_ids)
        block, d_block = stream
        return grads, (block, _put(d_block, _slice(d_block, start, dk.shape[0]) + dk, start))

    (d_queries, d_scale, d_bias), (_, d_keys) = _ring_pass(
        layout, keys, grads, forward_loss, visit,
        # Both matmuls that read the chunk feed this: d_scale and d_queries.
        written_after=lambda grads: grads[1] + grads[0][0, 0], extras=lambda: (zeros(),))
    hops = _ring_hops(layout)
    if hops:  # the travelling gradient ends `hops` shards past its keys' owner: one permute home
        d_keys = _send(layout, d_keys, -hops)
    return d_queries, d_keys, d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def blockwise_loss_sum(layout, queries, keys, scale, bias, after):
    """Sum over this shard's queries [rows, embed] of their loss against all keys; scalar [].

    `after` is a scalar that the computation waits for (the other softmax direction's loss), so
    the two directions' rings run one after the other instead of holding both at once. Its
    gradient is zero; in the backward pass it carries the order back the other way.
    """
    return _blocks_forward(layout, queries, keys, scale, bias, after)[0]


def _blockwise_loss_sum_fwd(layout, queries, keys, scale, bias, after):
    loss, row_lse = _blocks_forward(layout, queries, keys, scale, bias, after)
    # Residuals are shard-local ([rows] and the inputs), so the backward memory is flat too.
    return loss, (queries, keys, scale, bias, row_lse, loss)


def _blockwise_loss_sum_bwd(layout, residuals, cotangent):
    d_queries, d_keys, d_scale, d_bias = _blocks_backward(layout, *residuals, cotangent)
    # Exactly zero, but computed from this backward pass: the one before waits for it.
    return d_queries, d_keys, d_scale, d_bias, _in_turn(jnp.zeros(()), d_scale)


blockwise_loss_sum.defvjp(_blockwise_loss_sum_fwd, _blockwise_loss_sum_bwd)
