"""The optax chain from config: warmup + decay schedule, global-norm clipping, AdamW whose weight decay
skips biases, norms, embeddings and the scalars t and b."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from siglip_jax.config import SCHEDULES


def learning_rate_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak over `warmup_steps`, then the configured decay to `total_steps`."""
    peak = optim_config.learning_rate
    warmup = min(optim_config.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * optim_config.end_learning_rate_fraction
    name = optim_config.schedule
    if name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.end_learning_rate_fraction)
    elif name == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif name == "rsqrt":
        # Continuous at the end of warmup: peak * sqrt(warmup / step).
        timescale = max(warmup, 1)
        decay = lambda count: peak * jax.lax.rsqrt((count + timescale) / timescale)  # noqa: E731
    elif name == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"Unknown optim.schedule {name!r}; valid: {', '.join(SCHEDULES)}.")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for matrices that get weight decay: every "kernel" (dense, attention and patch projections);
    False for biases, LayerNorm scales, token/position embeddings, the MAP probe, t and b."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        # The last dict key names the parameter; logically boxed parameters add an attribute key after it.
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_config, total_steps)
    chain = []
    if optim_config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    if optim_config.name == "adamw":
        chain.append(
            optax.scale_by_adam(
                b1=optim_config.b1,
                b2=optim_config.b2,
                eps=optim_config.eps,
                mu_dtype=jnp.dtype(optim_config.mu_dtype),
            )
        )
    elif optim_config.name == "sgd":
        chain.append(optax.trace(decay=optim_config.b1))
    else:
        raise ValueError(f"Unknown optim.name {optim_config.name!r}; valid: adamw, sgd.")
    if optim_config.weight_decay > 0:
        # Decoupled decay scaled by the learning rate, as optax.adamw does.
        chain.append(optax.add_decayed_weights(optim_config.weight_decay, mask=weight_decay_mask))
    chain.append(optax.scale_by_learning_rate(schedule))
    optimizer = optax.chain(*chain)
    frozen = tuple(optim_config.frozen)
    if not frozen:
        return optimizer
    # Frozen groups (e.g. ("img",) for LiT) get zero updates and no optimizer moments.
    def labels(params: Any) -> dict[str, str]:
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise ValueError(f"optim.frozen names {unknown}, which are not parameter groups; valid: {sorted(params)}.")
        return {name: ("frozen" if name in frozen else "trained") for name in params}

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def update_count(opt_state: Any) -> jax.Array:
    """The number of updates the optimizer has applied: the count its learning-rate schedule reads. It
    lags TrainState.step by the non-finite steps that were skipped, so it, not the step, gives the
    learning rate an update used."""
    counts = [
        state.count
        for state in jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState))
        if isinstance(state, optax.ScaleByScheduleState)
    ]
    if len(counts) != 1:
        raise ValueError(f"Expected one learning-rate schedule in the optimizer state, found {len(counts)}.")
    return counts[0]
