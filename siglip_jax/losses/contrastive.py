"""Sigmoid (SigLIP) and softmax (CLIP) contrastive losses, plain and sharded over the batch.

Every variant computes the same number: the loss over the GLOBAL batch. They differ in how the
other side's embeddings ("keys") reach a device's own rows ("queries"):

* `all_gather`: each device gathers all keys ([global_batch, embed]) and scores its rows against
  them at once. Simple and fast; memory grows with the number of devices.
* `ring`: each device keeps its rows and passes blocks of keys around a ring with
  `jax.lax.ppermute` (n-1 hops). A block is forwarded in pieces,
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

The blockwise sum they share (the ring and chunk schedules, its custom VJP, the ordering that
keeps memory flat) is in `losses_blockwise.py`; this module is the public API: the references,
input checks and dispatch.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from siglip_jax.config import LOSS_IMPLEMENTATIONS, LOSS_NAMES  # noqa: F401 -- the choices, defined once
from siglip_jax.losses import blockwise
from siglip_jax.losses.blockwise import PRECISION


# ----------------------------------------------------------------------------------- references
def sigmoid_loss(image_embeddings, text_embeddings, log_temperature, bias):
    """SigLIP loss over one unsharded batch: -(1/B) sum_ij log sigmoid(z_ij (exp(t) x_i.y_j + b)).

    Args: image_embeddings [batch, embed], text_embeddings [batch, embed] (L2-normalised),
      log_temperature t [], bias b []. Returns the scalar loss in float32.
    """
    x, y, t, b = (jnp.asarray(a, jnp.float32) for a in
                  (image_embeddings, text_embeddings, log_temperature, bias))
    logits = jnp.exp(t) * jnp.matmul(x, y.T, precision=PRECISION) + b
    labels = 2.0 * jnp.eye(x.shape[0], dtype=jnp.float32) - 1.0  # z: +1 on the diagonal, -1 off it
    return jnp.sum(jax.nn.softplus(-labels * logits)) / x.shape[0]


def softmax_loss(image_embeddings, text_embeddings, log_temperature):
    """CLIP loss over one unsharded batch: mean of image->text and text->image cross-entropies.

    Args: image_embeddings [batch, embed], text_embeddings [batch, embed], log_temperature t [].
    Returns the scalar loss in float32; the targets are the diagonal of exp(t) x.y^T.
    """
    x, y, t = (jnp.asarray(a, jnp.float32) for a in
               (image_embeddings, text_embeddings, log_temperature))
    logits = jnp.exp(t) * jnp.matmul(x, y.T, precision=PRECISION)
    positives = jnp.trace(logits)
    rows = jnp.sum(jax.nn.logsumexp(logits, axis=1)) - positives
    columns = jnp.sum(jax.nn.logsumexp(logits, axis=0)) - positives
    return (rows + columns) / (2 * x.shape[0])



# ----------------------------------------------------------------------------------- public API
def _nearest(valid, value, count=4):
    """Up to `count` entries of `valid` closest to value, in order."""
    return sorted(sorted(valid, key=lambda v: (abs(v - value), v))[:count])


def _validate(name, implementation, batch, num_shards, axes, chunk_size):
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


def clamp_log_temperature(log_temperature: jax.Array, max_temperature: float) -> jax.Array:
    """min(t, log(max_temperature)), so exp(t) <= max_temperature, as open_clip clamps its logit scale
    at 100; t gets no gradient while clamped. max_temperature 0 returns t unchanged."""
    if max_temperature < 0:
        raise ValueError(f"max_temperature must be > 0 (or 0 for no clamp), got {max_temperature}.")
    if not max_temperature:
        return log_temperature
    return jnp.minimum(log_temperature, jnp.log(jnp.float32(max_temperature)))


def contrastive_loss(image_embeddings, text_embeddings, log_temperature, bias, *,
                     name: str = "sigmoid", implementation: str = "all_gather",
                     mesh: jax.sharding.Mesh | None = None,
                     batch_axes: tuple[str, ...] = ("data", "fsdp"), chunk_size: int = 0,
                     max_temperature: float = 0.0) -> jax.Array:
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
      max_temperature: > 0 clamps exp(t) at it (see clamp_log_temperature); 0: no clamp.
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
    t = clamp_log_temperature(t, max_temperature)
    if name == "softmax":
        b = jnp.zeros((), jnp.float32)  # CLIP has no bias; zero keeps one code path
    layout = blockwise.Layout(name, axes, num_shards, implementation, chunk_size)

    def local_loss_sum(images, texts, t, b):
        # [rows, embed] per shard (the whole batch when unsharded) -> this shard's share of the sum.
        scale = jnp.exp(t)
        if axes:  # replicated scalars meet per-shard sums: their cotangents differ per shard
            scale, b = (jax.lax.pcast(v, axes, to="varying") for v in (scale, b))
        pairs = [(images, texts)] if name == "sigmoid" else [(images, texts), (texts, images)]
        total = blockwise.per_shard(layout, jnp.zeros(()))
        for queries, keys in pairs:
            if axes and implementation == "all_gather":  # this shard's rows against all keys
                keys = jax.lax.all_gather(keys, axes, tiled=True)
            total = total + blockwise.blockwise_loss_sum(layout, queries, keys, scale, b,
                                                                total)
        return total

    normaliser = batch if name == "sigmoid" else 2 * batch  # softmax: mean of two directions
    if not axes:
        return local_loss_sum(x, y, t, b) / normaliser
    spec = PartitionSpec(axes)
    sharded = jax.shard_map(lambda *args: jax.lax.psum(local_loss_sum(*args), axes),
                            mesh=mesh, in_specs=(spec, spec, PartitionSpec(), PartitionSpec()),
                            out_specs=PartitionSpec())
    return sharded(x, y, t, b) / normaliser
