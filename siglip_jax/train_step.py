"""The train state and the pure train step; no I/O. The trainer jit-compiles `train_step` once."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from siglip_jax import losses
from siglip_jax.sharding import logical_to_shardings


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. Immutable: `apply_gradients` returns a new state."""

    step: jax.Array  # int32 scalar: the number of updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # key for stochastic layers and augmentation, folded with the step

    def apply_gradients(self, grads: Any, optimizer: optax.GradientTransformation) -> "TrainState":
        updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)


def compute_loss(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    loss_config: ml_collections.ConfigDict,
    mesh: Mesh | None,
    batch_axes: tuple[str, ...],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Contrastive loss of a global batch {"images": [b, h, w, 3], "tokens": [b, l]}."""
    image_embeddings, text_embeddings = model.apply({"params": params}, batch["images"], batch["tokens"])
    loss = losses.contrastive_loss(
        image_embeddings,
        text_embeddings,
        params["t"],
        params["b"],
        name=loss_config.name,
        implementation=loss_config.implementation,
        mesh=mesh,
        batch_axes=batch_axes,
        chunk_size=loss_config.chunk_size,
        bidirectional=loss_config.bidirectional,
    )
    return loss, {"loss": loss}


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
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one global batch; returns the new state and scalar metrics."""
    with nn.logical_axis_rules(axis_rules):
        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (_, metrics), grads = grad_fn(
            state.params, batch, model=model, loss_config=loss_config, mesh=mesh, batch_axes=batch_axes
        )
    new_state = state.apply_gradients(grads, optimizer)
    metrics = {
        **metrics,
        "learning_rate": schedule(state.step),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(state.params),
        "temperature": jnp.exp(new_state.params["t"]),
        "bias": new_state.params["b"],
    }
    return new_state, metrics


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    image_size: int,
    text_length: int,
    mesh: Mesh,
    axis_rules: Any,
    rng: jax.Array,
) -> tuple[TrainState, Any]:
    """Initialises the state already sharded over the mesh: shapes from `jax.eval_shape`, shardings
    from the parameters' logical names, then one jit whose outputs land in place (never whole on one
    device). Returns the state and its tree of NamedShardings."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, text_length), jnp.int32)

    def init_boxed(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = model.init(params_rng, images, tokens)["params"]
        # The optimizer state inherits the parameters' logical boxes, so it is sharded like them.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=state_rng)

    # No logical-rules context here: the output shardings place the state, and flax would otherwise
    # constrain its initialisers' intermediate (flattened) kernels with the parameters' final names.
    abstract = jax.eval_shape(init_boxed, rng)
    shardings = logical_to_shardings(abstract, mesh, axis_rules)
    state = jax.jit(lambda rng: nn.unbox(init_boxed(rng)), out_shardings=shardings)(rng)
    return state, shardings
