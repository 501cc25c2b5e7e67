"""The optax chain from config: warmup + decay schedule, global-norm clipping, AdamW whose weight decay
skips biases, norms, embeddings and the scalars t and b, and per-parameter rules by regex over the
parameter path ("img/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel"): learning-rate and
weight-decay multipliers (big_vision's lr_mults / wd_mults), layer-wise learning-rate decay, freezing.

Weight decay conventions (optim.weight_decay_convention), with lr(step) the schedule and peak its top:
  "optax"      p -= lr(step) * (update + wd * p)               as optax.adamw
  "big_vision" p -= lr(step) * update + lr(step) / peak * wd * p  as big_vision's `wd` (SigLIP's 1e-4)
so the same number is peak-times (1,000x at lr 1e-3) weaker in the optax convention."""
from __future__ import annotations

from typing import Any

import re

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


def parameter_path(path: tuple[Any, ...]) -> str:
    """"img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel" for a tree path; the attribute keys of
    logically boxed parameters are left out."""
    return "/".join(str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey))


def parameter_paths(params: Any) -> list[str]:
    return [parameter_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_patterns(params: Any, patterns: tuple[str, ...], key: str) -> None:
    paths = parameter_paths(params)
    for pattern in patterns:
        if not any(re.fullmatch(pattern, path) for path in paths):
            shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
            raise ValueError(
                f"optim.{key} regex {pattern!r} matches no parameter path (it must match a whole path). "
                f"Parameter paths: {shown}."
            )


def _first_match(rules: tuple[tuple[str, float], ...], path: str, default: float) -> float:
    return next((float(value) for pattern, value in rules if re.fullmatch(pattern, path)), default)


def weight_decay_mask(params: Any) -> Any:
    """True for matrices that get weight decay: every "kernel" (dense, attention and patch projections);
    False for biases, LayerNorm scales, token/position embeddings, the MAP probe, t and b."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = parameter_path(path).split("/")
        return names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def weight_decay_multipliers(params: Any, wd_mults: tuple[tuple[str, float], ...]) -> Any:
    """Per-parameter decay multiplier: the first `(regex, multiplier)` rule fully matching the path, else
    0; no rules: 1 on kernels, 0 elsewhere (weight_decay_mask)."""
    if not wd_mults:
        return jax.tree.map(float, weight_decay_mask(params))
    return jax.tree_util.tree_map_with_path(lambda path, _: _first_match(wd_mults, parameter_path(path), 0.0), params)


_BLOCK = re.compile(r"^(?P<tower>[^/]+)/.*?encoderblock(_(?P<index>\d+))?/")
_EMBEDDINGS = re.compile(r"^[^/]+/(embedding|pos_embedding|Embed_0)/")


def _tower_depths(params: Any) -> dict[str, int]:
    """Blocks per tower: the count of encoderblock_{i}, or the layers axis of a stacked encoderblock."""
    depths: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        match = _BLOCK.match(parameter_path(path))
        if match:
            index = match.group("index")
            depth = int(index) + 1 if index is not None else int(jnp.shape(leaf)[0])
            depths[match.group("tower")] = max(depths.get(match.group("tower"), 0), depth)
    return depths


def learning_rate_multipliers(params: Any, lr_mults: tuple[tuple[str, float], ...], layer_decay: float) -> Any:
    """Per-parameter learning-rate multiplier: the first fully matching `(regex, multiplier)` rule (else 1)
    times the layer-wise decay: decay^(depth - i) for block i of a tower with `depth` blocks,
    decay^(depth + 1) for the tower's patch/token and position embeddings, 1 for what follows the blocks.
    A stacked (scan_layers) encoderblock gets an array of multipliers along its leading layers axis."""
    depths = _tower_depths(params) if layer_decay else {}

    def multiplier(path: tuple[Any, ...], leaf: Any) -> Any:
        name = parameter_path(path)
        value = _first_match(lr_mults, name, 1.0)
        if not layer_decay:
            return value
        block = _BLOCK.match(name)
        if block:
            depth = depths[block.group("tower")]
            if block.group("index") is not None:
                return value * layer_decay ** (depth - int(block.group("index")))
            per_layer = layer_decay ** (depth - jnp.arange(depth, dtype=jnp.float32))
            return value * per_layer.reshape((depth,) + (1,) * (jnp.ndim(leaf) - 1))
        if _EMBEDDINGS.match(name) and name.split("/")[0] in depths:
            return value * layer_decay ** (depths[name.split("/")[0]] + 1)
        return value

    return jax.tree_util.tree_map_with_path(multiplier, params)


def _scale_per_parameter(multipliers_of: Any) -> optax.GradientTransformation:
    """Multiplies each update by `multipliers_of(updates)` (a tree of scalars or broadcastable arrays);
    stateless, the multipliers follow from the tree's paths and shapes alone."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers_of(updates)), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _decay_per_parameter(rate: float, wd_mults: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
    """update + rate * multiplier * p, the multiplier from weight_decay_multipliers."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("Weight decay needs the parameters: call optimizer.update(grads, state, params).")
        mults = weight_decay_multipliers(params, wd_mults)
        return jax.tree.map(lambda u, p, m: u + rate * m * p if m else u, updates, params, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _validated(init: Any, optim_config: ml_collections.ConfigDict) -> Any:
    def checked_init(params):
        _check_patterns(params, tuple(p for p, _ in optim_config.lr_mults), "lr_mults")
        _check_patterns(params, tuple(p for p, _ in optim_config.wd_mults), "wd_mults")
        _check_patterns(params, tuple(optim_config.freeze), "freeze")
        return init(params)

    return checked_init


def build_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optax chain of `optim_config` with its learning-rate schedule over `total_steps`."""
    return optimizer_with_schedule(optim_config, learning_rate_schedule(optim_config, total_steps))


def optimizer_with_schedule(optim_config: ml_collections.ConfigDict,
                            schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optax chain of `optim_config` driven by `schedule` (build_training passes the one it also logs)."""
    lr_mults = tuple((pattern, float(mult)) for pattern, mult in optim_config.lr_mults)
    wd_mults = tuple((pattern, float(mult)) for pattern, mult in optim_config.wd_mults)
    if any(mult <= 0 for _, mult in lr_mults):
        raise ValueError(f"optim.lr_mults {lr_mults} must be > 0; freeze parameters with optim.freeze instead.")
    if optim_config.layer_decay < 0 or optim_config.layer_decay > 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1] (0: off), got {optim_config.layer_decay}.")
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
    per_lr = lr_mults or optim_config.layer_decay
    lr_scale = _scale_per_parameter(lambda tree: learning_rate_multipliers(tree, lr_mults, optim_config.layer_decay))
    convention = optim_config.weight_decay_convention
    if per_lr and convention == "big_vision":
        chain.append(lr_scale)  # big_vision's lr_mults scale the gradient part only
    if optim_config.weight_decay > 0:
        rate = optim_config.weight_decay
        if convention == "big_vision":
            if optim_config.learning_rate <= 0:
                raise ValueError("weight_decay_convention 'big_vision' divides by the peak learning rate, which is 0; "
                                 "set optim.learning_rate > 0 or use the 'optax' convention.")
            rate = rate / optim_config.learning_rate  # times lr(step) below: lr(step) / peak * wd
        elif convention != "optax":
            raise ValueError(f"Unknown optim.weight_decay_convention {convention!r}; valid: big_vision, optax.")
        chain.append(_decay_per_parameter(rate, wd_mults))
    if per_lr and convention == "optax":
        chain.append(lr_scale)  # a per-parameter learning rate, decay included, as per-group lr in optax
    chain.append(optax.scale_by_learning_rate(schedule))
    optimizer = optax.chain(*chain)
    frozen = tuple(optim_config.frozen)
    freeze = tuple(optim_config.freeze)
    if not frozen and not freeze:
        return optimizer._replace(init=_validated(optimizer.init, optim_config))

    # Frozen groups (e.g. ("img",) for LiT) and parameters matching optim.freeze get zero updates and no
    # optimizer moments.
    def labels(params: Any) -> Any:
        unknown = sorted(set(frozen) - set(params))
        if unknown:
            raise ValueError(f"optim.frozen names {unknown}, which are not parameter groups; valid: {sorted(params)}.")

        def label(path: tuple[Any, ...], _: Any) -> str:
            name = parameter_path(path)
            is_frozen = name.split("/")[0] in frozen or any(re.fullmatch(pattern, name) for pattern in freeze)
            return "frozen" if is_frozen else "trained"

        return jax.tree_util.tree_map_with_path(label, params)

    combined = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
    return combined._replace(init=_validated(combined.init, optim_config))


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


# ---- Exponential moving average of the parameters (optim.ema_decay) ----------------------------------

def ema_decay_at(decay: float, num_updates: jax.Array) -> jax.Array:
    """The decay the EMA uses after `num_updates` optimizer updates were already applied:
    min(decay, (1 + n) / (10 + n)), the warm-up of tf.train.ExponentialMovingAverage(num_updates=n), so the
    average follows the fast-moving early parameters instead of keeping the initialisation for ~1/(1-decay)
    steps. Float32 scalar."""
    count = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + count) / (10.0 + count))


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
    """decay * ema + (1 - decay) * params, leaf by leaf, in each EMA leaf's dtype."""
    return jax.tree.map(lambda average, new: (decay * average + (1.0 - decay) * new).astype(average.dtype),
                        ema_params, params)
