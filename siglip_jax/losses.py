"""Sigmoid (SigLIP) and softmax (CLIP) contrastive losses, plain and sharded over the batch.

Every variant computes the same number: the loss over the GLOBAL batch. They differ in where the
logits live:

* `all_gather`: each device gathers the other side's embeddings ([global_batch, embed]) and scores
  its own rows against all of them. Simple; memory grows with the number of devices.
* `ring`: each device keeps its own rows and passes blocks of the other side's embeddings around a
  ring with `jax.lax.ppermute` (n-1 hops, or n/2 with `bidirectional`). It holds the block being
  scored and the one arriving (twice that, and their gradients, in the backward pass and when
  bidirectional), so memory does not depend on the number of devices.
* `chunk_size > 0` ("chunked"): within a device the logits are computed `chunk_size` columns at a
  time, so no [per_device_batch, block] logits matrix is materialised. Combines with both.

Both losses are written as a sum over "query" rows scored against all "key" rows, the positive of
query i being key i:
    sigmoid: sum_i sum_j softplus(-z_ij l_ij),        queries = images, keys = texts
    softmax: sum_i logsumexp_j(l_ij) - l_ii,         once images->texts, once texts->images
with l_ij = exp(t) q_i.k_j + b. The column direction of CLIP is the row direction with the roles of
the towers swapped, so no device ever needs a column of the global matrix.

Autodiff through a ring loop would save every hop's block for the backward pass (memory growing
with the number of devices), so the blockwise sum has a custom VJP: the backward pass runs the ring
again, recomputing each logits block and sending the key gradients around with the keys.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

LOSS_NAMES = ("sigmoid", "softmax")
LOSS_IMPLEMENTATIONS = ("all_gather", "ring")

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
    ring: bool             # keys arrive by ppermute (True) or were gathered beforehand (False)
    bidirectional: bool
    chunk_size: int        # columns scored at once; 0 means the whole block


def _shard_index(layout):
    return jax.lax.axis_index(layout.axes) if layout.axes else 0


def _per_shard(layout, value):
    """A fresh constant typed as varying per shard, as carries of per-shard loops must be."""
    return jax.lax.pcast(value, layout.axes, to="varying") if layout.axes else value


def _after(block, previous_result):
    """`block`, made to depend on the previous block's scalar result so blocks are scored in turn.

    XLA unrolls loops of one hop and would then compute all their logits at once (the CPU backend
    also drops optimization barriers); with all_gather there is one block and nothing to order. Adding 0 * x costs one pass over [block, embed],
    small beside the [rows, block] matmul; it is not folded away because 0 * inf is not 0.
    """
    return block + 0.0 * previous_result


def _shift(layout, x, offset):
    """Sends x from shard i to shard i + offset (mod num_shards)."""
    n = layout.num_shards
    if offset % n == 0:
        return x
    return jax.lax.ppermute(x, layout.axes, perm=[(i, (i + offset) % n) for i in range(n)])


def _hops(layout):
    """(hops the keys travel forward, hops they travel backward); forward means to shard i + 1."""
    if not layout.ring:
        return 0, 0
    if layout.bidirectional:
        return layout.num_shards // 2, (layout.num_shards - 1) // 2
    return layout.num_shards - 1, 0


def _chunks(layout, keys):
    """[block, embed] -> [num_chunks, chunk, embed]; the chunk loop keeps logits [rows, chunk]."""
    chunk = layout.chunk_size or keys.shape[0]
    return keys.reshape(keys.shape[0] // chunk, chunk, keys.shape[1])


def _column_ids(layout, keys, hop):
    """Global batch index of each key in the block that arrived after `hop` hops ([block] int)."""
    owner = (_shard_index(layout) - hop) % layout.num_shards if layout.ring else 0
    return owner * keys.shape[0] + jnp.arange(keys.shape[0])


def _blocks_forward(layout, queries, keys, scale, bias):
    """Loss sum of this shard's queries against every key block, and their row logsumexp [rows]."""
    row_ids = _shard_index(layout) * queries.shape[0] + jnp.arange(queries.shape[0])

    def visit(carry, block, hop):
        block = _after(block, carry[0]) if layout.ring else block

        def chunk_step(carry, chunk_and_ids):
            loss, row_lse = carry
            chunk, column_ids = chunk_and_ids
            block_loss, row_lse = _block_forward(layout.name, queries, chunk, scale, bias,
                                                 row_ids, column_ids, row_lse)
            return (loss + block_loss, row_lse), None
        ids = _column_ids(layout, block, hop).reshape(_chunks(layout, block).shape[:2])
        return jax.lax.scan(chunk_step, carry, (_chunks(layout, block), ids))[0]

    initial = (jnp.zeros(()), jnp.full(queries.shape[:1], -jnp.inf))
    carry = visit(_per_shard(layout, initial), keys, 0)
    forward_hops, backward_hops = _hops(layout)

    def both_ways(hop, state):
        carry, ahead, behind = state
        ahead, behind = _shift(layout, ahead, 1), _shift(layout, behind, -1)
        return visit(visit(carry, ahead, hop), behind, -hop), ahead, behind

    def ahead_only(hop, state):  # the rest of a one-way ring, or the odd hop of an even ring
        carry, ahead, behind = state
        ahead = _shift(layout, ahead, 1)
        return visit(carry, ahead, hop), ahead, behind

    state = (carry, keys, keys if backward_hops else None)
    if backward_hops:
        state = jax.lax.fori_loop(1, backward_hops + 1, both_ways, state)
    (loss, row_lse), _, _ = jax.lax.fori_loop(backward_hops + 1, forward_hops + 1, ahead_only,
                                              state)
    if layout.name == "softmax":
        loss = loss + jnp.sum(row_lse)
    return loss, row_lse


def _blocks_backward(layout, queries, keys, scale, bias, row_lse, cotangent):
    """Runs the key blocks past the queries again; key gradients travel with their keys."""
    row_ids = _shard_index(layout) * queries.shape[0] + jnp.arange(queries.shape[0])

    def visit(grads, block, d_block, hop):
        block = _after(block, grads[1]) if layout.ring else block

        chunks = _chunks(layout, block)

        def chunk_step(carry, chunk_and_ids):
            (d_queries, d_scale, d_bias), d_block, start = carry
            chunk, column_ids = chunk_and_ids
            dq, dk, ds, db = _block_backward(layout.name, queries, chunk, scale, bias, row_ids,
                                             column_ids, row_lse, cotangent)
            # Accumulated in place into the travelling block gradient: no second block-sized buffer.
            d_rows = jax.lax.dynamic_slice_in_dim(d_block, start, chunk.shape[0]) + dk
            d_block = jax.lax.dynamic_update_slice_in_dim(d_block, d_rows, start, 0)
            return ((d_queries + dq, d_scale + ds, d_bias + db), d_block, start + chunk.shape[0]), None
        ids = _column_ids(layout, block, hop).reshape(chunks.shape[:2])
        (grads, d_block, _), _ = jax.lax.scan(chunk_step, (grads, d_block, 0), (chunks, ids))
        return grads, d_block

    zeros = _per_shard(layout, (jnp.zeros(queries.shape), jnp.zeros(()), jnp.zeros(()),
                                jnp.zeros(keys.shape)))
    # The own block's key gradient starts the forward stream, which ends one hop short of home.
    grads, d_ahead = visit(zeros[:3], keys, zeros[3], 0)
    forward_hops, backward_hops = _hops(layout)

    def both_ways(hop, state):
        grads, ahead, d_ahead, behind, d_behind = state
        ahead, d_ahead = _shift(layout, (ahead, d_ahead), 1)
        behind, d_behind = _shift(layout, (behind, d_behind), -1)
        grads, d_ahead = visit(grads, ahead, d_ahead, hop)
        grads, d_behind = visit(grads, behind, d_behind, -hop)
        return grads, ahead, d_ahead, behind, d_behind

    def ahead_only(hop, state):
        grads, ahead, d_ahead, behind, d_behind = state
        ahead, d_ahead = _shift(layout, (ahead, d_ahead), 1)
        grads, d_ahead = visit(grads, ahead, d_ahead, hop)
        return grads, ahead, d_ahead, behind, d_behind

    state = (grads, keys, d_ahead) + ((keys, zeros[3]) if backward_hops else (None, None))
    if backward_hops:
        state = jax.lax.fori_loop(1, backward_hops + 1, both_ways, state)
    (d_queries, d_scale, d_bias), _, d_ahead, _, d_behind = jax.lax.fori_loop(
        backward_hops + 1, forward_hops + 1, ahead_only, state)
    # Each travelling gradient ends `hops` shards away from the keys' owner: one permute home.
    d_keys = _shift(layout, d_ahead, -forward_hops)
    if backward_hops:
        d_keys = d_keys + _shift(layout, d_behind, backward_hops)
    return d_queries, d_keys, d_scale, d_bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_loss_sum(layout, queries, keys, scale, bias):
    """Sum over this shard's queries [rows, embed] of their loss against all keys; scalar []."""
    return _blocks_forward(layout, queries, keys, scale, bias)[0]


def _blockwise_loss_sum_fwd(layout, queries, keys, scale, bias):
    loss, row_lse = _blocks_forward(layout, queries, keys, scale, bias)
    # Residuals are shard-local ([rows] and the inputs), so the backward memory is flat too.
    return loss, (queries, keys, scale, bias, row_lse)


def _blockwise_loss_sum_bwd(layout, residuals, cotangent):
    return _blocks_backward(layout, *residuals, cotangent)


_blockwise_loss_sum.defvjp(_blockwise_loss_sum_fwd, _blockwise_loss_sum_bwd)


# ----------------------------------------------------------------------------------- public API
def _validate(name, implementation, batch, num_shards, axes, chunk_size):
    if name not in LOSS_NAMES:
        raise ValueError(f"Unknown loss name={name!r}; valid names are {LOSS_NAMES}. "
                         "Set config.loss.name to one of them.")
    if implementation not in LOSS_IMPLEMENTATIONS:
        raise ValueError(f"Unknown loss implementation={implementation!r}; valid ones are "
                         f"{LOSS_IMPLEMENTATIONS} (chunking is chunk_size > 0 on either).")
    if batch % num_shards:
        below, above = batch - batch % num_shards, batch - batch % num_shards + num_shards
        raise ValueError(f"Global batch {batch} is not divisible by the {num_shards} shards of "
                         f"mesh axes {axes}: it is {batch % num_shards} over a multiple. Use a "
                         f"batch of {below} or {above}.")
    per_device = batch // num_shards
    if chunk_size < 0 or (chunk_size and per_device % chunk_size):
        divisors = [c for c in range(1, per_device + 1) if per_device % c == 0]
        raise ValueError(f"chunk_size={chunk_size} does not divide the per-device batch "
                         f"{per_device} (remainder {per_device % chunk_size if chunk_size else '-'}"
                         f"); use 0 (no chunking) or a divisor such as {divisors[-4:]}.")


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
      chunk_size: if > 0, score this many columns at a time; must divide the per-device batch.
      bidirectional: ring only; send blocks both ways round the ring, halving the hops.
    Returns:
      The scalar float32 loss, replicated; differentiable in all four inputs.
    """
    axes = tuple(a for a in batch_axes if mesh is not None and a in mesh.axis_names)
    num_shards = 1
    for axis in axes:
        num_shards *= mesh.shape[axis]
    batch = image_embeddings.shape[0]
    _validate(name, implementation, batch, num_shards, axes, chunk_size)
    x, y, t, b = (jnp.asarray(a, jnp.float32) for a in
                  (image_embeddings, text_embeddings, log_temperature, bias))
    if name == "softmax":
        b = jnp.zeros((), jnp.float32)  # CLIP has no bias; zero keeps one code path
    ring = implementation == "ring" and num_shards > 1
    layout = _Layout(name, axes, num_shards, ring, bidirectional, chunk_size)

    def local_loss_sum(images, texts, t, b):
        # [rows, embed] per shard (the whole batch when unsharded) -> this shard's share of the sum.
        scale = jnp.exp(t)
        if axes:  # replicated scalars meet per-shard sums: their cotangents differ per shard
            scale, b = (jax.lax.pcast(v, axes, to="varying") for v in (scale, b))
        pairs = [(images, texts)] if name == "sigmoid" else [(images, texts), (texts, images)]
        total = 0.0
        for queries, keys in pairs:
            if axes and not ring:  # all_gather: this shard's rows against the whole batch
                keys = jax.lax.all_gather(keys, axes, tiled=True)
            total = total + _blockwise_loss_sum(layout, queries, keys, scale, b)
        return total

    normaliser = batch if name == "sigmoid" else 2 * batch  # softmax: mean of two directions
    if not axes:
        return local_loss_sum(x, y, t, b) / normaliser
    spec = PartitionSpec(axes)
    sharded = jax.shard_map(lambda *args: jax.lax.psum(local_loss_sum(*args), axes),
                            mesh=mesh, in_specs=(spec, spec, PartitionSpec(), PartitionSpec()),
                            out_specs=PartitionSpec())
    return sharded(x, y, t, b) / normaliser
