"""Sigmoid (SigLIP) and softmax (CLIP) contrastive losses, plain and sharded over the batch.

Every variant computes the same number: the loss over the GLOBAL batch. They differ in how the
other side's embeddings ("keys") reach a device's own rows ("queries"):

* `all_gather`: each device gathers all keys ([global_batch, embed]) and scores its rows against
  them at once. Simple and fast; memory grows with the number of devices.
* `ring`: each device keeps its rows and passes blocks of keys around a ring with
  `jax.lax.ppermute` (n-1 hops, or n/2 with `bidirectional`). A block is forwarded in pieces,
  each arriving piece written over the one that left, so a stream holds one block (plus its
  gradient in the backward pass): memory does not depend on the number of devices.
* `chunked`: keys are all-gathered and scored `chunk_size` at a time (chunk_size / n from every
  device), so neither the gathered keys nor the [rows, global_batch] logits are materialised;
  the chunk gradients are reduce-scattered back. The smallest memory, flat in the device count.
* `ring` with `chunk_size`: the ring scores each block `chunk_size` keys at a time and forwards
  each chunk as soon as it is scored (the combination of the two).

Both losses are written as a sum over query rows scored against all key rows, the positive of
query i being key i:
    sigmoid: sum_i sum_j softplus(-z_ij l_ij),        queries = images, keys = texts
    softmax: sum_i logsumexp_j(l_ij) - l_ii,         once images->texts, once texts->images
with l_ij = exp(t) q_i.k_j + b. The column direction of CLIP is the row direction with the roles of
the towers swapped, so no device ever needs a column of the global matrix.

Autodiff through a ring loop would save every hop's block for the backward pass (memory growing
with the number of devices), so the blockwise sum has a custom VJP: the backward pass runs the ring
again, recomputing each logits chunk and sending the key gradients around with the keys.

Memory also depends on the order XLA runs things in, which data dependencies alone fix here
(`_in_turn`): in-place writes after the reads they overwrite, the backward after the forward, one
softmax direction after the other. `bench/loss_memory.py` measures the result.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

LOSS_NAMES = ("sigmoid", "softmax")
LOSS_IMPLEMENTATIONS = ("all_gather", "ring", "chunked")

_PRECISION = jax.lax.Precision.HIGHEST  # f32 matmuls on TPU/GPU, so all variants agree to 1e-5


# ----------------------------------------------------------------------------------- references
def sigmoid_loss(image_embeddings, text_embeddings, log_temperature, bias):
    """SigLIP loss over one unsharded batch: -(1/B) sum_ij log sigmoid(z_ij (exp(t) x_i.y_j + b)).

    Args: image_embeddings [batch, embed], text_embeddings [batch, embed] (L2-normalised),
      log_temperature t [], bias b []. Returns the scalar loss in float32.
    """
    x, y, t, b = (jnp.asarray(a, jnp.float32) for a in
                  (image_embeddings, text_embeddings, log_temperature, bias))
    logits = jnp.exp(t) * jnp.matmul(x, y.T, precision=_PRECISION) + b
    labels = 2.0 * jnp.eye(x.shape[0], dtype=jnp.float32) - 1.0  # z: +1 on the diagonal, -1 off it
    return jnp.sum(jax.nn.softplus(-labels * logits)) / x.shape[0]


def softmax_loss(image_embeddings, text_embeddings, log_temperature):
    """CLIP loss over one unsharded batch: mean of image->text and text->image cross-entropies.

    Args: image_embeddings [batch, embed], text_embeddings [batch, embed], log_temperature t [].
    Returns the scalar loss in float32; the targets are the diagonal of exp(t) x.y^T.
    """
    x, y, t = (jnp.asarray(a, jnp.float32) for a in
               (image_embeddings, text_embeddings, log_temperature))
    logits = jnp.exp(t) * jnp.matmul(x, y.T, precision=_PRECISION)
    positives = jnp.trace(logits)
    rows = jnp.sum(jax.nn.logsumexp(logits, axis=1)) - positives
    columns = jnp.sum(jax.nn.logsumexp(logits, axis=0)) - positives
    return (rows + columns) / (2 * x.shape[0])


# ------------------------------------------------------------------------ one block of the logits
def _block_forward(name, queries, keys, scale, bias, row_ids, column_ids, row_lse):
    """Scores queries [rows, embed] against one key block [columns, embed].

    Returns (this block's loss sum [], row_lse [rows] updated with this block's columns); the
    running logsumexp is only used by softmax (for sigmoid it passes through).
    """
    logits = scale * jnp.matmul(queries, keys.T, precision=_PRECISION) + bias
    positive = row_ids[:, None] == column_ids[None, :]
    if name == "sigmoid":
        labels = jnp.where(positive, 1.0, -1.0)
        return jnp.sum(jax.nn.softplus(-labels * logits)), row_lse
    # softmax: the logsumexp is added per row once all blocks are seen; here only the positives.
    loss = -jnp.sum(jnp.where(positive, logits, 0.0))
    return loss, jnp.logaddexp(row_lse, jax.nn.logsumexp(logits, axis=1))


def _block_backward(name, queries, keys, scale, bias, row_ids, column_ids, row_lse, cotangent):
    """Gradient of the block's share of the loss sum: (d_queries, d_keys, d_scale, d_bias)."""
    dots = jnp.matmul(queries, keys.T, precision=_PRECISION)
    logits = scale * dots + bias
    positive = row_ids[:, None] == column_ids[None, :]
    if name == "sigmoid":
        labels = jnp.where(positive, 1.0, -1.0)
        d_logits = -labels * jax.nn.sigmoid(-labels * logits)  # d softplus(-z l) / dl
    else:
        d_logits = jnp.exp(logits - row_lse[:, None]) - positive  # softmax minus one-hot
    d_logits = cotangent * d_logits
    d_queries = scale * jnp.matmul(d_logits, keys, precision=_PRECISION)
    d_keys = scale * jnp.matmul(d_logits.T, queries, precision=_PRECISION)
    return d_queries, d_keys, jnp.sum(d_logits * dots), jnp.sum(d_logits)


# ------------------------------------------------------------------ rows against all key blocks
class _Layout(NamedTuple):
    """Static description of how keys reach a device (hashable: it is a custom_vjp nondiff arg)."""
    name: str
    axes: tuple            # mesh axes the batch is sharded over (present ones only); () unsharded
    num_shards: int        # product of their sizes
    implementation: str    # one of LOSS_IMPLEMENTATIONS
    bidirectional: bool
    chunk_size: int        # keys scored at once; 0 means a whole block


def _shard_index(layout):
    return jax.lax.axis_index(layout.axes) if layout.axes else 0


def _per_shard(layout, value):
    """A fresh constant typed as varying per shard, as carries of per-shard loops must be."""
    return jax.lax.pcast(value, layout.axes, to="varying") if layout.axes else value


def _in_turn(value, previous_result):
    """`value`, made to depend on a scalar computed earlier, so XLA cannot start with it sooner.

    Orders what data alone does not: in-place writes after the reads they overwrite, the second
    stream of a bidirectional hop after the first (else both logits blocks live at once), the
    backward pass after the forward, one softmax direction after the other. isfinite makes the
    added term exactly 0 even when previous_result is inf or NaN; XLA does not fold 0 * x for
    floats, so the dependency survives (optimization barriers do not on every backend). It costs
    one pass over `value`, so it is applied to chunks, pieces and scalars where it can be.
    """
    return value + 0.0 * jnp.isfinite(previous_result).astype(value.dtype)


def _send(layout, x, direction):
    """Sends x (an array or a tuple of them) from shard i to shard i + direction, mod num_shards."""
    n = layout.num_shards
    return jax.lax.ppermute(x, layout.axes, perm=[(i, (i + direction) % n) for i in range(n)])


def _ring_hops(layout):
    """{direction: hops its stream of key blocks travels}; direction +1 sends to shard i + 1."""
    if layout.implementation != "ring":
        return {}
    n = layout.num_shards
    hops = {1: n // 2, -1: (n - 1) // 2} if layout.bidirectional else {1: n - 1}
    return {direction: count for direction, count in hops.items() if count > 0}


def _ring_schedule(layout):
    """Hops 1, 2, ... grouped into runs that score and forward the same streams; each run becomes
    one loop: [(first_hop, last_hop, directions scored, directions forwarded)]."""
    hops = _ring_hops(layout)
    runs = []
    for hop in range(1, max(hops.values(), default=0) + 1):
        scored = tuple(d for d, count in hops.items() if hop <= count)
        forwarded = tuple(d for d, count in hops.items() if hop < count)
        if runs and runs[-1][2:] == [scored, forwarded]:
            runs[-1][1] = hop
        else:
            runs.append([hop, hop, scored, forwarded])
    return runs


def _run_hops(first, last, one_hop, state):
    """Applies one_hop(hop, state) for hop = first..last; a loop, so the program size is O(1)."""
    if first == last:
        return one_hop(first, state)
    return jax.lax.fori_loop(first, last + 1, one_hop, state)


def _column_ids(layout, block_rows, start, size, hop, direction, own):
    """Global batch indices of keys [start, start + size) of the block scored at `hop` from
    stream `direction` (`own`: hop 0, this shard's own block, or the whole gathered batch)."""
    if own:
        owner = 0 if layout.implementation == "all_gather" else _shard_index(layout)
    else:
        owner = (_shard_index(layout) - direction * hop) % layout.num_shards
    return owner * block_rows + start + jnp.arange(size)


def _gathered_chunk(layout, keys, index):
    """Chunk `index` of the `chunked` implementation: rows [start, start + step) of every shard's
    keys, all-gathered ([chunk_size, embed]), their global batch indices, and start."""
    step = layout.chunk_size // layout.num_shards  # each shard's share of a chunk
    start = index * step
    chunk = jax.lax.all_gather(_slice(keys, start, step), layout.axes, tiled=True)
    shards = jnp.arange(layout.num_shards)[:, None] * keys.shape[0]
    return chunk, (shards + start + jnp.arange(step)[None, :]).reshape(-1), start


def _run_ring(layout, one_hop, state):
    """Hop 0 (the own block, which starts every stream; +1 holds it), then the ring's later hops
    run by run. Without a ring it is hop 0 alone: the keys already hold everything."""
    state = one_hop(0, state, scored=(1,), forwarded=tuple(_ring_hops(layout)), own=True)
    for first, last, scored, forwarded in _ring_schedule(layout):
        state = _run_hops(first, last, functools.partial(
            one_hop, scored=scored, forwarded=forwarded), state)
    return state


def _slice(block, start, size):
    return jax.lax.dynamic_slice_in_dim(block, start, size)


def _put(block, update, start):
    return jax.lax.dynamic_update_slice_in_dim(block, update, start, 0)


def _forward_rows(layout, direction, buffers, start, size, piece, after):
    """Sends rows [start, start + size) of each buffer (a tuple) to the next shard in `direction`,
    `piece` rows at a time, each arriving piece written over the rows that just left.

    So a stream holds one block in flight, not the block leaving plus the one arriving. The writes
    wait for `after` (a result of scoring these rows): otherwise XLA cannot order the scoring's
    reads before the in-place writes and copies the whole buffer instead.
    """
    def one_piece(index, buffers):
        at = start + index * piece
        arriving = _send(layout, tuple(_slice(b, at, piece) for b in buffers), direction)
        return tuple(_put(b, _in_turn(a, after), at) for b, a in zip(buffers, arriving))
    if size == piece:
        return one_piece(0, buffers)
    return jax.lax.fori_loop(0, size // piece, one_piece, buffers)


def _piece_rows(block_rows, chunk):
    """Rows sent per ppermute: a chunk, or an eighth of an unchunked block (a divisor of it)."""
    if chunk < block_rows:
        return chunk
    return max(d for d in range(1, -(-block_rows // 8) + 1) if block_rows % d == 0)


def _blocks_forward(layout, queries, keys, scale, bias, after):
    """Loss sum of this shard's queries against every key, and their row logsumexp [rows].

    `keys` is this shard's block ([global_batch, embed] already gathered for all_gather). Each ring
    stream starts as a copy of the own block and is scored, then forwarded, chunk by chunk.
    """
    rows, block_rows = queries.shape[0], keys.shape[0]
    row_ids = _shard_index(layout) * rows + jnp.arange(rows)
    loss, row_lse = _per_shard(layout, (jnp.zeros(()), jnp.full((rows,), -jnp.inf)))
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
        chunk = layout.chunk_size or block_rows
        piece = _piece_rows(block_rows, chunk)
        hops = _ring_hops(layout)

        def one_hop(hop, state, scored, forwarded, own=False):
            def chunk_step(index, state):
                carry, streams = state
                start = index * chunk
                for i, d in enumerate(scored):
                    block_chunk = _slice(streams[d], start, chunk)
                    if i:  # both streams of a bidirectional ring: one after the other
                        block_chunk = _in_turn(block_chunk, carry[0])
                    carry = score(carry, block_chunk, _column_ids(
                        layout, block_rows, start, chunk, hop, d, own))
                for d in forwarded:
                    streams = {**streams, d: _forward_rows(layout, d, (streams[d],), start,
                                                           chunk, piece, carry[0])[0]}
                return carry, streams
            return jax.lax.fori_loop(0, block_rows // chunk, chunk_step, state)

        # Streams are fresh copies of the keys in any case; making them wait costs nothing more.
        # (d * after: distinct expressions, so that XLA does not merge the streams' copies.)
        streams = {d: _in_turn(keys, d * after) for d in hops} or {1: keys}
        (loss, row_lse), _ = _run_ring(layout, one_hop, (carry, streams))
    if layout.name == "softmax":
        loss = loss + jnp.sum(row_lse)
    return loss, row_lse


def _blocks_backward(layout, queries, keys, scale, bias, row_lse, forward_loss, cotangent):
    """Scores the keys against the queries again. Each key chunk's gradient travels with it and is
    sent home when the stream has been everywhere; d_queries, d_scale and d_bias stay local."""
    rows, block_rows = queries.shape[0], keys.shape[0]
    row_ids = _shard_index(layout) * rows + jnp.arange(rows)
    d_queries, d_scale, d_bias = _per_shard(layout, (jnp.zeros(queries.shape), jnp.zeros(()),
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

    zeros = lambda: _per_shard(layout, jnp.zeros(keys.shape))  # noqa: E731
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

    chunk = layout.chunk_size or block_rows
    piece = _piece_rows(block_rows, chunk)
    hops = _ring_hops(layout)

    def one_hop(hop, state, scored, forwarded, own=False):
        def chunk_step(index, state):
            grads, streams = state
            start = index * chunk
            for i, d in enumerate(scored):
                block, d_block = streams[d]
                block_chunk = _slice(block, start, chunk)
                if i:  # both streams of a bidirectional ring: one after the other
                    block_chunk = _in_turn(block_chunk, grads[1])
                grads, dk = gradients(grads, block_chunk, _column_ids(
                    layout, block_rows, start, chunk, hop, d, own))
                d_block = _put(d_block, _slice(d_block, start, chunk) + dk, start)
                streams = {**streams, d: (block, d_block)}
            # Both matmuls that read the chunk feed this: d_scale and d_queries.
            chunk_result = grads[1] + grads[0][0, 0]
            for d in forwarded:
                # At hop 0 only the forward stream carries a gradient (the own block's).
                travelling = streams[d] if not own or d == 1 else streams[d][:1]
                sent = _forward_rows(layout, d, travelling, start, chunk, piece, chunk_result)
                streams = {**streams, d: sent + streams[d][len(sent):]}
            return grads, streams
        return jax.lax.fori_loop(0, block_rows // chunk, chunk_step, state)

    # Streams are fresh copies of the keys in any case; making them wait costs nothing more.
    streams = ({d: (_in_turn(keys, d * forward_loss), zeros()) for d in hops}
               or {1: (keys, zeros())})
    (d_queries, d_scale, d_bias), streams = _run_ring(layout, one_hop, (grads, streams))
    if not hops:
        return d_queries, streams[1][1], d_scale, d_bias
    # Each travelling gradient ends `count` shards past its keys' owner: one permute home.
    d_keys = None
    for d, count in hops.items():
        home = _send(layout, streams[d][1], -d * count)
        d_keys = home if d_keys is None else d_keys + home
    return d_queries, d_keys, d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_loss_sum(layout, queries, keys, scale, bias, after):
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


_blockwise_loss_sum.defvjp(_blockwise_loss_sum_fwd, _blockwise_loss_sum_bwd)


# ----------------------------------------------------------------------------------- public API
def _nearest(valid, value, count=4):
    """Up to `count` entries of `valid` closest to value, in order."""
    return sorted(sorted(valid, key=lambda v: (abs(v - value), v))[:count])


def _validate(name, implementation, batch, num_shards, axes, chunk_size, bidirectional):
    if name not in LOSS_NAMES:
        raise ValueError(f"Unknown loss name={name!r}; valid names are {LOSS_NAMES}. "
                         "Set config.loss.name to one of them.")
    if implementation not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"Unknown loss implementation={implementation!r}; valid ones are "
                         f"{LOSS_IMPLEMENTATIONS}.")
    if batch % num_shards:
        below, above = batch - batch % num_shards, batch - batch % num_shards + num_shards
        raise ValueError(f"Global batch {batch} is not divisible by the {num_shards} shards of "
                         f"mesh axes {axes}: it is {batch % num_shards} over a multiple. Use a "
                         f"batch of {below} or {above}.")
    if bidirectional and implementation != "ring":
        raise ValueError(f"bidirectional=True applies to implementation='ring' only, not "
                         f"{implementation!r}; set bidirectional=False or use 'ring'.")
    per_device = batch // num_shards
    divisors = [c for c in range(1, per_device + 1) if per_device % c == 0]
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size} is negative; use 0 (no chunking) or a "
                         f"positive number of keys scored at once.")
    if implementation == "all_gather" and chunk_size:
        raise ValueError(f"chunk_size={chunk_size} does not apply to implementation='all_gather'"
                         ", which scores the whole gathered batch at once. Use "
                         "implementation='chunked' to gather and score it chunk by chunk (memory "
                         "independent of the number of devices), or chunk_size=0.")
    if implementation == "ring" and chunk_size and per_device % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} does not divide the per-device batch "
                         f"{per_device} (remainder {per_device % chunk_size}); with 'ring' use 0 "
                         f"(whole blocks) or a divisor such as {_nearest(divisors, chunk_size)}.")
    if implementation == "chunked":
        # A chunk takes chunk_size / num_shards keys from every shard.
        valid = [num_shards * d for d in divisors]
        if chunk_size not in valid:
            raise ValueError(
                f"implementation='chunked' scores chunk_size keys at a time, chunk_size / "
                f"num_shards from each of the {num_shards} shards, so chunk_size must be "
                f"{num_shards} x a divisor of the per-device batch {per_device}; got {chunk_size}. "
                f"Use e.g. {_nearest(valid, chunk_size)}.")


def contrastive_loss(image_embeddings, text_embeddings, log_temperature, bias, *,
                     name: str = "sigmoid", implementation: str = "all_gather",
                     mesh: jax.sharding.Mesh | None = None,
                     batch_axes: tuple[str, ...] = ("data", "fsdp"), chunk_size: int = 0,
                     bidirectional: bool = False) -> jax.Array:
    """The global-batch contrastive loss, computed with the batch sharded over `batch_axes`.

    Args:
      image_embeddings: [batch, embed] global array, L2-normalised, batch sharded over batch_axes.
      text_embeddings: [batch, embed], sharded the same way.
      log_temperature: [] t; the logits are exp(t) x.y + b.
      bias: [] b; ignored by softmax (its gradient is zero).
      name: one of LOSS_NAMES.
      implementation: one of LOSS_IMPLEMENTATIONS (see the module docstring).
      mesh: the device mesh, or None for the plain single-array computation.
      batch_axes: mesh axes the batch is sharded over; axes absent from the mesh are ignored.
      chunk_size: keys scored at a time. 'chunked' needs it: num_shards x a divisor of the
        per-device batch (each shard gives chunk_size / num_shards keys to every chunk). 'ring'
        takes 0 (whole blocks) or a divisor of the per-device batch. 'all_gather' takes 0.
      bidirectional: ring only; send blocks both ways round the ring, halving the hops.
    Returns:
      The scalar float32 loss, replicated; differentiable in all four inputs.
    """
    axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
    num_shards = 1
    for axis in axes:
        num_shards *= mesh.shape[axis]
    batch = image_embeddings.shape[0]
    _validate(name, implementation, batch, num_shards, axes, chunk_size, bidirectional)
    x, y, t, b = (jnp.asarray(a, jnp.float32) for a in
                  (image_embeddings, text_embeddings, log_temperature, bias))
    if name == "softmax":
        b = jnp.zeros((), jnp.float32)  # CLIP has no bias; zero keeps one code path
    layout = _Layout(name, axes, num_shards, implementation, bidirectional, chunk_size)

    def local_loss_sum(images, texts, t, b):
        # [rows, embed] per shard (the whole batch when unsharded) -> this shard's share of the sum.
        scale = jnp.exp(t)
        if axes:  # replicated scalars meet per-shard sums: their cotangents differ per shard
            scale, b = (jax.lax.pcast(v, axes, to="varying") for v in (scale, b))
        pairs = [(images, texts)] if name == "sigmoid" else [(images, texts), (texts, images)]
        total = _per_shard(layout, jnp.zeros(()))
        for queries, keys in pairs:
            if axes and implementation == "all_gather":  # this shard's rows against all keys
                keys = jax.lax.all_gather(keys, axes, tiled=True)
            total = total + _blockwise_loss_sum(layout, queries, keys, scale, b, total)
        return total

    normaliser = batch if name == "sigmoid" else 2 * batch  # softmax: mean of two directions
    if not axes:
        return local_loss_sum(x, y, t, b) / normaliser
    spec = PartitionSpec(axes)
    sharded = jax.shard_map(lambda *args: jax.lax.psum(local_loss_sum(*args), axes),
                            mesh=mesh, in_specs=(spec, spec, PartitionSpec(), PartitionSpec()),
                            out_specs=PartitionSpec())
    return sharded(x, y, t, b) / normaliser
