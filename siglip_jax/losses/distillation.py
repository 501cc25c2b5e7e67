"""SigLIP 2's two self-supervised losses on the image tower, pure functions of projection-head logits:

* SILC's self-distillation: the student's local views predict the teacher's (an EMA of the image tower)
  global view, DINO-style: the teacher's logits are centred (a running mean subtracted, against collapse to
  one prototype) and sharpened (a low temperature), and the student's softmax at a higher temperature is
  scored by cross-entropy against them;
* TIPS's masked patch prediction: the student sees some patches replaced by a mask token and predicts, at
  those positions, the teacher's per-patch distribution (same centring and sharpening).

The teacher side never gets a gradient (`stop_gradient` here, so callers cannot forget it). Temperatures,
centre momentum and mask ratio come in as arguments (model config `distill`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def teacher_targets(teacher_logits: jax.Array, center: jax.Array, temperature: float) -> jax.Array:
    """softmax((teacher_logits - center) / temperature) over the last axis, in float32, with no gradient."""
    logits = (teacher_logits.astype(jnp.float32) - center.astype(jnp.float32)) / temperature
    return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def _cross_entropy(targets: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """-sum_k targets_k * log_softmax(student / temperature)_k over the last axis."""
    log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(targets * log_probs, axis=-1)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array, *,
                      student_temperature: float, teacher_temperature: float) -> jax.Array:
    """SILC: the mean over views and examples of the cross-entropy between the teacher's centred, sharpened
    global view and each of the student's views.

    student_logits [views, batch, prototypes] (the local crops), teacher_logits [batch, prototypes] (the global
    view), center [prototypes]."""
    targets = teacher_targets(teacher_logits, center, teacher_temperature)
    return jnp.mean(_cross_entropy(targets[None], student_logits, student_temperature))


def masked_patch_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, center: jax.Array, *,
                      student_temperature: float, teacher_temperature: float) -> jax.Array:
    """TIPS: the mean, over masked patches only, of the cross-entropy between the teacher's centred, sharpened
    per-patch distribution and the student's prediction at that patch.

    student_logits and teacher_logits [batch, patches, prototypes], mask [batch, patches] (True: the student saw
    the mask token there), center [prototypes]. No masked patch gives 0."""
    targets = teacher_targets(teacher_logits, center, teacher_temperature)
    weights = mask.astype(jnp.float32)
    per_patch = _cross_entropy(targets, student_logits, student_temperature)
    return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def updated_center(center: jax.Array, teacher_logits: jax.Array, momentum: float) -> jax.Array:
    """The running centre after a step: momentum * center + (1 - momentum) * the mean teacher logits over every
    leading axis (the whole global batch under jit, whatever the sharding). No gradient flows through it."""
    batch_mean = jnp.mean(teacher_logits.astype(jnp.float32).reshape(-1, teacher_logits.shape[-1]), axis=0)
    return jax.lax.stop_gradient(momentum * center + (1.0 - momentum) * batch_mean)


def patch_mask(key: jax.Array, batch: int, num_patches: int, ratio: float) -> jax.Array:
    """[batch, num_patches] bool: exactly round(ratio * num_patches) patches of each example, drawn uniformly
    without replacement (a fixed count, so the shapes stay static under jit)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio {ratio} must be in [0, 1) (SigLIP 2: 0.5).")
    count = round(ratio * num_patches)
    scores = jax.random.uniform(key, (batch, num_patches))
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return ranks < count
