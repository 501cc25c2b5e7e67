"""The train state, the pure train step, and `build_training`: everything a run needs (model, optimizer,
sharded state, the one jitted step) from a config and a mesh. No I/O. The trainer, the benches and the
tests all step through `build_training(...).step`, the only jit of the train step."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from siglip_jax.io import checkpoint
from siglip_jax.losses import captioning as captioning_lib
from siglip_jax.losses import contrastive
from siglip_jax.losses import distillation as distillation_lib
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.runtime.sharding import logical_to_shardings
from siglip_jax.training import optim


def _all_finite(tree: Any) -> jax.Array:
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)), tree))


def _updated_params(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. Immutable: `apply_gradients` returns a new state."""

    step: jax.Array  # int32 scalar: the number of batches consumed (updates applied plus non-finite skips)
    params: Any
    opt_state: Any

    def apply_gradients(self, grads: Any, optimizer: optax.GradientTransformation, *, loss: jax.Array,
                        centers: dict[str, jax.Array] | None = None) -> tuple["TrainState", jax.Array]:
        """(the state after one update with `grads`, whether the update was applied). An update whose loss,
        gradient or new parameters are not finite is not applied: parameters, optimizer state (and EMA)
        stay as they were and only the step counter advances, as the batch was consumed. The new parameters
        are checked too: a finite gradient times a huge learning rate (or a damaged parameter) can still
        overflow, and a NaN parameter would poison every later step."""
        # Decided before anything is written: the check recomputes the new parameters from inputs passed through
        # an optimisation barrier (so XLA cannot share them with the update) in reductions that write nothing,
        # and the cond then writes the state once. Selecting between the updated and the old state instead
        # materialised every new parameter and copied every old one: the S/16 tail took 244 ms, now 138 ms, in
        # 40% fewer thunks (docs/speed.md).
        # One jitted update called twice: its second call reuses the first's trace (S/16: 0.4 s less tracing at
        # every start; losses and parameters bitwise as before).
        update = jax.jit(functools.partial(_updated_params, optimizer))
        check_grads, check_opt_state, check_params = jax.lax.optimization_barrier((grads, self.opt_state, self.params))
        finite = (jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
                  & _all_finite(update(check_grads, check_opt_state, check_params)[0]))

        def updated(state_and_grads: tuple["TrainState", Any]) -> "TrainState":
            state, grads = state_and_grads
            return state._updated(*update(grads, state.opt_state, state.params))._distilled(centers)

        def skipped(state_and_grads: tuple["TrainState", Any]) -> "TrainState":
            state, _ = state_and_grads
            return state.replace(step=state.step + 1)

        return jax.lax.cond(finite, updated, skipped, (self, grads)), finite

    def _updated(self, params: Any, opt_state: Any) -> "TrainState":
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)

    def _distilled(self, centers: dict[str, jax.Array] | None) -> "TrainState":
        """The updated state with its distillation teacher and centres moved (DistillationState); as it is here."""
        return self

    def with_params(self, params: Any) -> "TrainState":
        """The state starting from `params` (init_from)."""
        return self.replace(params=params)


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A TrainState that also keeps an exponential moving average of the parameters (optim.ema_decay > 0),
    sharded like them, moved by every applied update. A subclass rather than an optional field, so a run
    without EMA saves and restores exactly the state (and the checkpoints) it did before EMA existed; the
    decay is configuration, not saved (a static field)."""

    ema_params: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    def current_ema_decay(self) -> jax.Array:
        """The decay the next applied update moves the EMA by: optim.ema_decay_at of the updates applied so far
        (optim.update_count, which skipped steps do not advance)."""
        return optim.ema_decay_at(self.ema_decay, optim.update_count(self.opt_state))

    def _updated(self, params: Any, opt_state: Any) -> "EmaTrainState":
        ema_params = optim.ema_update(self.ema_params, params, self.current_ema_decay())
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)

    def with_params(self, params: Any) -> "EmaTrainState":
        """The state starting from `params` (init_from), the EMA too, in buffers of its own (the step
        donates the state, and a buffer cannot be donated twice)."""
        return self.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


class DistillationState:
    """The methods of a train state that carries SigLIP 2's self-distillation (model.distill): `distill` =
    {"teacher": the EMA of params' "img" and "distill" groups, "center" and "patch_center": the running means
    subtracted from the teacher's logits}, `teacher_decay` static. Subclasses (with and without the EMA of the
    parameters) rather than an optional field, so runs without it save and restore exactly the state and
    checkpoints they did before it existed."""

    def _distilled(self, centers: dict[str, jax.Array] | None) -> Any:
        # Called on the updated state, whose `distill` is still the step's input: the teacher follows every
        # applied update, the centres are the step's new ones.
        teacher = optim.ema_update(self.distill["teacher"], distilled_params(self.params), self.teacher_decay)
        return self.replace(distill={**self.distill, **(centers or {}), "teacher": teacher})

    def with_params(self, params: Any) -> Any:
        """The state starting from `params` (init_from), the teacher too, in buffers of its own."""
        teacher = jax.tree.map(jnp.copy, distilled_params(params))
        return super().with_params(params).replace(distill={**self.distill, "teacher": teacher})


@flax.struct.dataclass
class DistillTrainState(DistillationState, TrainState):
    distill: Any = None
    teacher_decay: float = flax.struct.field(pytree_node=False, default=0.0)


@flax.struct.dataclass
class EmaDistillTrainState(DistillationState, EmaTrainState):
    distill: Any = None
    teacher_decay: float = flax.struct.field(pytree_node=False, default=0.0)


def _without_frozen_gradients(params: Any, frozen: tuple[str, ...]) -> Any:
    """Frozen groups (e.g. ("img",) for LiT) get no gradient, so their backward pass is never computed."""
    return {name: jax.lax.stop_gradient(value) if name in frozen else value for name, value in params.items()}


def embed(params: Any, batch: dict[str, jax.Array], model: nn.Module, frozen: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """(image embeddings [b, d], text embeddings [b, d]) of {"images": [b, h, w, 3], "tokens": [b, l]}."""
    return model.apply({"params": _without_frozen_gradients(params, frozen)}, batch["images"], batch["tokens"])


@dataclasses.dataclass(frozen=True)
class Captioning:
    """SigLIP 2's caption-decoder task in the step (model.decoder): its loss weight, the share of examples
    decoded in parallel, the tokenizer's EOS id (the caption's end: padding after it is not predicted), the
    logits chunk, and the run's seed, from which each step draws its parallel examples."""

    weight: float
    parallel_prob: float
    eos_id: int
    logits_chunk: int
    seed: int

    def parallel_examples(self, step: jax.Array, batch_size: int) -> jax.Array:
        """[batch] bool, drawn from (seed, step): the same on every mesh and after a resume."""
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        return jax.random.bernoulli(key, self.parallel_prob, (batch_size,))


def captioning_task(config: ml_collections.ConfigDict, eos_id: int | None) -> Captioning | None:
    """The step's Captioning for `config` (None without a decoder); `eos_id` is the tokenizer's."""
    if not config.model.decoder.weight:
        return None
    if eos_id is None:
        raise ValueError("model.decoder.weight > 0 needs the tokenizer's EOS id: build_training(config, mesh, "
                         "eos_id=tokenizer.eos_id).")
    decoder = config.model.decoder
    return Captioning(weight=float(decoder.weight), parallel_prob=float(decoder.parallel_prob), eos_id=int(eos_id),
                      logits_chunk=int(decoder.logits_chunk), seed=int(config.seed))


DISTILLED_GROUPS = ("img", "distill")  # the parameter groups the teacher averages: the image tower and the head


def distilled_params(params: Any) -> dict[str, Any]:
    return {name: params[name] for name in DISTILLED_GROUPS}


@dataclasses.dataclass(frozen=True)
class Distillation:
    """SigLIP 2's SILC and TIPS losses in the step (model.distill): weights, the step they join at, the mask
    ratio, temperatures, the centres' momentum, and the run's seed, from which each step draws its masks."""

    weight: float
    masked_weight: float
    start_step: int
    mask_ratio: float
    student_temperature: float
    teacher_temperature: float
    center_momentum: float
    seed: int

    def patch_mask(self, step: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
        """[batch, patches] bool, drawn from (seed, step) on a stream apart from the decoder's."""
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 1), step)
        return distillation_lib.patch_mask(key, batch_size, num_patches, self.mask_ratio)


def distillation_task(config: ml_collections.ConfigDict) -> Distillation | None:
    """The step's Distillation for `config` (None when both of model.distill's losses are off)."""
    distill = config.model.distill
    if not two_towers.distills(config.model):
        return None
    return Distillation(weight=float(distill.weight), masked_weight=float(distill.masked_weight),
                        start_step=int(round(distill.start_fraction * config.total_steps)),
                        mask_ratio=float(distill.mask_ratio), student_temperature=float(distill.student_temperature),
                        teacher_temperature=float(distill.teacher_temperature),
                        center_momentum=float(distill.center_momentum), seed=int(config.seed))


def distillation_terms(params: Any, distill_state: dict[str, Any], batch: dict[str, jax.Array], step: jax.Array, *,
                       model: nn.Module, distillation: Distillation) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """(weighted sum of the SILC and TIPS losses, their named values, the updated centres) of a step at or after
    `distillation.start_step` (loss_and_grads switches them on). The teacher (`distill_state["teacher"]`) is
    applied with no gradient."""
    centers = _centers(distill_state)
    teacher = jax.lax.stop_gradient({**params, **distill_state["teacher"]})  # t, b, txt unused by these methods
    teacher_pooled, teacher_patches = model.apply({"params": teacher}, batch["images"], method=model.distill_logits)
    values, new_centers = {}, dict(centers)
    temperatures = dict(student_temperature=distillation.student_temperature,
                        teacher_temperature=distillation.teacher_temperature)
    if distillation.weight:
        student = model.apply({"params": params}, batch["local_images"], method=model.distill_local_logits)
        values["self_distillation_loss"] = distillation_lib.distillation_loss(
            student, teacher_pooled, centers["center"], **temperatures)
        new_centers["center"] = distillation_lib.updated_center(centers["center"], teacher_pooled,
                                                                distillation.center_momentum)
    if distillation.masked_weight:
        batch_size, num_patches = teacher_patches.shape[:2]
        mask = distillation.patch_mask(step, batch_size, num_patches)
        student = model.apply({"params": params}, batch["images"], mask, method=model.distill_masked_logits)
        values["masked_prediction_loss"] = distillation_lib.masked_patch_loss(
            student, teacher_patches, mask, centers["patch_center"], **temperatures)
        new_centers["patch_center"] = distillation_lib.updated_center(centers["patch_center"], teacher_patches,
                                                                      distillation.center_momentum)
    total = (distillation.weight * values.get("self_distillation_loss", 0.0)
             + distillation.masked_weight * values.get("masked_prediction_loss", 0.0))
    return total, values, new_centers


def waiting_distillation_terms(distill_state: dict[str, Any],
                               distillation: Distillation) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """distillation_terms' outputs for a step before `distillation.start_step`: zero losses, the centres unchanged."""
    names = [name for name, weight in (("self_distillation_loss", distillation.weight),
                                       ("masked_prediction_loss", distillation.masked_weight)) if weight]
    return jnp.zeros((), jnp.float32), {name: jnp.zeros((), jnp.float32) for name in names}, _centers(distill_state)


def _centers(distill_state: dict[str, Any]) -> dict[str, jax.Array]:
    return {"center": distill_state["center"], "patch_center": distill_state["patch_center"]}


def embedding_loss(
    image_embeddings: jax.Array,
    text_embeddings: jax.Array,
    log_temperature: jax.Array,
    bias: jax.Array,
    *,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...],
) -> jax.Array:
    """The configured contrastive loss of a global batch of embeddings."""
    return contrastive.contrastive_loss(
        image_embeddings,
        text_embeddings,
        log_temperature,
        bias,
        name=loss_config.name,
        implementation=loss_config.implementation,
        mesh=mesh,
        batch_axes=batch_axes,
        chunk_size=loss_config.chunk_size,
        max_temperature=loss_config.max_temperature,
    )


def _split_microbatches(x: jax.Array, num_microbatches: int) -> jax.Array:
    """[b, ...] -> [k, b/k, ...] where microbatch i holds rows i, i+k, i+2k, ...: every device's
    contiguous block of rows holds its share of every microbatch, so the split moves no data."""
    x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))


def _merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of _split_microbatches: [k, b/k, ...] -> [b, ...] in the original row order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def loss_and_grads(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...],
    accum_steps: int = 1,
    frozen: tuple[str, ...] = (),
    captioning: Captioning | None = None,
    parallel: jax.Array | None = None,
    distillation: Distillation | None = None,
    distill_state: dict[str, Any] | None = None,
    step: jax.Array | None = None,
) -> tuple[jax.Array, Any, dict[str, jax.Array], dict[str, jax.Array] | None]:
    """(loss of the global batch, its gradient with respect to all parameters, the loss's named parts, the
    distillation's updated centres or None).

    With `captioning` the loss is the contrastive loss plus weight x the caption decoder's (parts
    "contrastive_loss" and "caption_loss"), `parallel` [b] saying which examples the decoder predicts
    in parallel; with `distillation` also the weighted SILC and TIPS losses of `step` (distillation_terms,
    `distill_state` holding the teacher and centres); without either, the contrastive loss alone (no parts).

    With accum_steps = k > 1 the contrastive loss stays exact (every image still meets every caption of
    the global batch) while activations are kept for only b/k examples at a time (GradCache, Gao et al.
    2021): embed all k microbatches without keeping activations, take the loss and its gradient with
    respect to the embeddings once, then re-encode each microbatch and back-propagate its slice of
    those embedding gradients, summing the parameter gradients.
    """
    loss_fn = functools.partial(embedding_loss, loss_config=loss_config, mesh=mesh, batch_axes=batch_axes)
    if captioning is not None or distillation is not None:
        def combined_loss(params, distilling: bool):
            if captioning is not None:
                image_embeddings, text_embeddings, decoded = model.apply(
                    {"params": _without_frozen_gradients(params, frozen)}, batch["images"], batch["tokens"], parallel,
                    method=model.embed_and_decode)
            else:
                image_embeddings, text_embeddings = embed(params, batch, model, frozen)
            contrastive_part = loss_fn(image_embeddings, text_embeddings, params["t"], params["b"])
            parts, total, centers = {"contrastive_loss": contrastive_part}, contrastive_part, None
            if captioning is not None:
                parts["caption_loss"] = captioning_loss(decoded, batch["tokens"], captioning)
                total = total + captioning.weight * parts["caption_loss"]
            if distillation is not None:
                distill_total, distill_parts, centers = (
                    distillation_terms(_without_frozen_gradients(params, frozen), distill_state, batch, step,
                                       model=model, distillation=distillation)
                    if distilling else waiting_distillation_terms(distill_state, distillation))
                parts.update(distill_parts)
                total = total + distill_total
            return total, (parts, centers)

        def gradients(distilling: bool) -> Callable[[Any], tuple]:
            def compute(params):
                (loss, (parts, centers)), grads = jax.value_and_grad(
                    functools.partial(combined_loss, distilling=distilling), has_aux=True)(params)
                return loss, grads, parts, centers
            return compute

        if distillation is None or distillation.start_step <= 0:
            return gradients(distillation is not None)(params)
        # The switch is outside the gradient: a lax.cond inside it would make the waiting branch write zeros for
        # every activation the distillation branch keeps for the backward pass (its local views, the masked view).
        return jax.lax.cond(step >= distillation.start_step, gradients(True), gradients(False), params)
    if accum_steps == 1:
        def full_loss(params):
            image_embeddings, text_embeddings = embed(params, batch, model, frozen)
            return loss_fn(image_embeddings, text_embeddings, params["t"], params["b"])

        loss, grads = jax.value_and_grad(full_loss)(params)
        return loss, grads, {}, None

    microbatches = jax.tree.map(lambda x: _split_microbatches(x, accum_steps), batch)
    # Pass 1: embeddings only. lax.map compiles one microbatch and keeps nothing for a backward pass.
    image_embeddings, text_embeddings = jax.lax.map(lambda micro: embed(params, micro, model, frozen), microbatches)
    loss, (image_grads, text_grads, t_grad, b_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(
        _merge_microbatches(image_embeddings), _merge_microbatches(text_embeddings), params["t"], params["b"]
    )
    image_grads = _split_microbatches(image_grads, accum_steps)
    text_grads = _split_microbatches(text_grads, accum_steps)

    # Pass 2: re-encode each microbatch and pull its embedding gradients back to the parameters.
    def accumulate(grads: Any, inputs: tuple) -> tuple[Any, None]:
        micro, image_grad, text_grad = inputs
        _, pull_back = jax.vjp(lambda params: embed(params, micro, model, frozen), params)
        (micro_grads,) = pull_back((image_grad, text_grad))
        return jax.tree.map(jnp.add, grads, micro_grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (microbatches, image_grads, text_grads))
    # The towers do not read t and b; their gradients come from the loss alone.
    grads = {**grads, "t": grads["t"] + t_grad, "b": grads["b"] + b_grad}
    return loss, grads, {}, None


def captioning_loss(decoded: Any, token_ids: jax.Array, captioning: Captioning) -> jax.Array:
    """The caption decoder's mean token cross-entropy (losses.captioning) of a models.decoder.DecoderOutput."""
    return captioning_lib.caption_loss(decoded.hidden, decoded.head_kernel, decoded.head_bias, token_ids,
                                       captioning.eos_id, chunk_size=captioning.logits_chunk)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_config: ml_collections.ConfigDict,
    axis_rules: Any,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...],
    accum_steps: int = 1,
    frozen: tuple[str, ...] = (),
    captioning: Captioning | None = None,
    distillation: Distillation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one global batch; returns the new state and scalar metrics. The state's
    `apply_gradients` skips a non-finite update (reported as "nonfinite" = 1) and moves the EMA, if any."""
    parallel = None
    if captioning is not None:
        parallel = captioning.parallel_examples(state.step, batch["tokens"].shape[0])
    with nn.logical_axis_rules(axis_rules):
        loss, grads, loss_parts, centers = loss_and_grads(
            state.params, batch, model=model, loss_config=loss_config, mesh=mesh, batch_axes=batch_axes,
            accum_steps=accum_steps, frozen=frozen, captioning=captioning, parallel=parallel,
            distillation=distillation, distill_state=getattr(state, "distill", None), step=state.step,
        )
    new_state, finite = state.apply_gradients(grads, optimizer, loss=loss, centers=centers)
    metrics = {
        "loss": loss,
        "learning_rate": schedule(optim.update_count(state.opt_state)),  # what this update applied
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(state.params),
        "temperature": jnp.exp(new_state.params["t"]),
        "bias": new_state.params["b"],
        "nonfinite": 1 - finite.astype(jnp.int32),
        **loss_parts,
    }
    if isinstance(state, EmaTrainState):
        metrics["ema/decay"] = jnp.where(finite, state.current_ema_decay(), 0.0)  # 0: this step left the EMA unchanged
        metrics["ema/param_norm"] = optax.global_norm(new_state.ema_params)
    return new_state, metrics


def state_initialiser(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    image_shape: tuple[int, ...],
    text_length: int,
    mesh: Mesh,
    axis_rules: Any,
    ema_decay: float = 0.0,
    distillation: Distillation | None = None,
    teacher_decay: float = 0.0,
    prototypes: int = 0,
) -> tuple[Any, TrainState, Any]:
    """(init_state, the state's shapes, its shardings). `init_state(rng)` creates the initial TrainState
    already sharded over the mesh: shapes from `jax.eval_shape`, shardings from the parameters' logical
    names, then one jit whose outputs land in place (never whole on one device); it compiles on its first
    call, so a run that restores a checkpoint instead never builds a fresh state. `image_shape` is one
    example's ([size, size, 3], or a NaFlex tower's packed patches). With `ema_decay` > 0 the state is an
    EmaTrainState whose average starts equal to the parameters. With `distillation` the state's `distill` holds
    the teacher, equal to the image tower and head at first, and zero centres of `prototypes` entries."""
    images = jnp.zeros((1, *image_shape), jnp.float32)
    tokens = jnp.zeros((1, text_length), jnp.int32)

    def init_boxed(rng: jax.Array) -> TrainState:
        # The split keeps the initial parameters those of earlier versions, which also kept a state key.
        params_rng, _ = jax.random.split(rng)
        params = model.init(params_rng, images, tokens)["params"]
        # The optimizer state inherits the parameters' logical boxes, so it is sharded like them.
        fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
        if ema_decay:  # the EMA copy inherits the boxes too: sharded exactly like the parameters
            fields.update(ema_params=jax.tree.map(jnp.copy, params), ema_decay=ema_decay)
        if distillation is not None:
            center = nn.with_logical_partitioning(jnp.zeros, (None,))((prototypes,), jnp.float32)
            fields.update(teacher_decay=teacher_decay, distill={
                "teacher": jax.tree.map(jnp.copy, distilled_params(params)), "center": center,
                "patch_center": jax.tree.map(jnp.copy, center)})
            return (EmaDistillTrainState if ema_decay else DistillTrainState)(**fields)
        return (EmaTrainState if ema_decay else TrainState)(**fields)

    # No logical-rules context here: out_shardings alone places the state; activation constraints on a
    # batch of one would only add work to the initialisation.
    abstract = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = logical_to_shardings(abstract, mesh, axis_rules)
    init_state = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings,
                         compiler_options=_init_compiler_options(mesh))
    return init_state, nn.unbox(abstract), shardings


def _init_compiler_options(mesh: Mesh) -> dict[str, Any] | None:
    """The initialiser runs once, so on CPU it is compiled without XLA's backend optimisations: their
    compile time outweighs what they save. Measured on 2 CPU cores (docs/testing.md): the tests' one-block
    towers 3.8 s to compile at the default level, 1.3 s at level 0; B/16 + B text (203M parameters)
    21.9 s + 1.6 s to run against 15.4 s + 8.6 s. Accelerators keep their defaults."""
    if all(device.platform == "cpu" for device in mesh.devices.flat):
        return {"xla_backend_optimization_level": 0}
    return None


@dataclasses.dataclass(frozen=True)
class Training:
    """Everything a run needs, built once from a config and a mesh (see `build_training`): plain values and
    two compiled-on-first-call functions, no state."""

    model: nn.Module
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    axis_rules: Any
    batch_axes: tuple[str, ...]  # the mesh axes the global batch is split over
    state_shardings: Any  # a TrainState of NamedShardings
    abstract_state: Any  # a TrainState of ShapeDtypeStructs carrying those shardings: what a restore targets
    batch_sharding: NamedSharding
    # rng -> the initial TrainState, created sharded (jax.random.key(config.seed) for the run's own).
    init_state: Any
    # (state, batch) -> (new state, scalar metrics); donates the state. Call inside `jax.set_mesh(mesh)`.
    step: Any
    distillation: Distillation | None = None  # SigLIP 2's SILC / TIPS in the step (its start step), or None


def build_training(config: ml_collections.ConfigDict, mesh: Mesh, *, eos_id: int | None = None) -> Training:
    """Model, optimizer, schedule, the state's shardings, its initialiser and the one jitted train step for
    `config` on `mesh`. Nothing is compiled or allocated here: a run that restores a checkpoint restores into
    `abstract_state`, one that starts fresh calls `init_state(jax.random.key(config.seed))`. `eos_id`, the
    tokenizer's, is needed with a caption decoder (model.decoder.weight > 0) only."""
    axis_rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    sharding.check_batch_size(config.data.batch_size, mesh, axis_rules)
    sharding.check_accumulation(config.data.batch_size, config.accum_steps, mesh, axis_rules)
    batch_sharding = sharding.batch_sharding(mesh, axis_rules)
    batch_axes = sharding.batch_axes(mesh, axis_rules)
    model = two_towers.build_model(config.model)
    distillation = distillation_task(config)
    schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    optimizer = optim.optimizer_with_schedule(config.optim, schedule)  # the schedule built once, logged as used
    init_state, state_shapes, state_shardings = state_initialiser(
        model, optimizer, image_shape=two_towers.image_input_shape(config.model),
        text_length=config.model.text.max_len, mesh=mesh, axis_rules=axis_rules, ema_decay=config.optim.ema_decay,
        distillation=distillation, teacher_decay=config.model.distill.teacher_decay,
        prototypes=config.model.distill.prototypes,
    )
    step = jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            loss_config=config.loss,
            axis_rules=axis_rules,
            mesh=mesh,
            batch_axes=batch_axes,
            accum_steps=config.accum_steps,
            frozen=tuple(config.optim.frozen),
            captioning=captioning_task(config, eos_id),
            distillation=distillation,
        ),
        in_shardings=(state_shardings, batch_sharding),  # (state, batch)
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),  # (state, scalar metrics)
        donate_argnums=0,  # the old state's buffers are reused for the new one
    )
    return Training(
        model=model, optimizer=optimizer, schedule=schedule, mesh=mesh, axis_rules=axis_rules,
        batch_axes=batch_axes, state_shardings=state_shardings,
        abstract_state=checkpoint.abstract_like(state_shapes, state_shardings),
        batch_sharding=batch_sharding, init_state=init_state, step=step, distillation=distillation,
    )
