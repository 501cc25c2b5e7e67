"""Gradient accumulation (GradCache), frozen towers and the non-finite guard."""
import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.runtime import sharding
from siglip_jax.training import optim
from siglip_jax.training.train_step import build_training, loss_and_grads
from tests.helpers import tiny_config

MESH_SHAPE = (4, 1, 1)  # 16 examples: 4 per device, split into 2 or 4 microbatches


@pytest.fixture(scope="module")
def setup():
    """One training for every case: a cosine rate (it changes per update: see the skipped step below) and
    the image tower frozen, so that the frozen-tower case and the non-finite guard share one compiled step
    (each step program costs ~20 s under two workers; each had its own until 2026-12-06)."""
    config = tiny_config(**{"optim.schedule": "cosine", "optim.frozen": ("img",)})
    mesh = sharding.create_mesh(MESH_SHAPE, ("data", "fsdp", "tensor"), jax.devices()[:4])
    training = build_training(config, mesh)
    rng = np.random.default_rng(1)
    batch = {
        "images": rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8),
        "tokens": rng.integers(3, 259, (16, 12)).astype(np.int32),
    }
    batch = jax.device_put(batch, training.batch_sharding)
    return config, mesh, training, batch, training.init_state(jax.random.key(config.seed))


def _grads(setup, accum_steps):
    config, mesh, training, batch, state = setup
    rules, model = training.axis_rules, training.model

    @jax.jit
    def run(params, batch):
        with nn.logical_axis_rules(rules):
            loss, grads, _, _ = loss_and_grads(
                params, batch, model=model, loss_config=config.loss, mesh=mesh,
                batch_axes=sharding.batch_axes(mesh, rules), accum_steps=accum_steps,
            )
            return loss, grads

    with jax.set_mesh(mesh):
        return jax.device_get(run(state.params, batch))


@pytest.fixture(scope="module")
def full_batch_gradient(setup):
    """Computed once for both accumulation cases: each call of _grads compiles a program of its own."""
    return _grads(setup, 1)


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_gradient_equals_full_batch_gradient(setup, full_batch_gradient, accum_steps):
    reference_loss, reference_grads = full_batch_gradient
    loss, grads = _grads(setup, accum_steps)
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-6)
    flat_reference = jax.tree.leaves(reference_grads)
    scale = max(float(np.max(np.abs(g))) for g in flat_reference)
    for got, want in zip(jax.tree.leaves(grads), flat_reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def _step(training, batch, state):
    """One step of the trainer's own jitted step, on a copy (the step donates its input state)."""
    with jax.set_mesh(training.mesh):
        return training.step(jax.tree.map(jnp.copy, state), batch)


def test_nonfinite_step_is_skipped_and_reported(setup):
    _, _, training, batch, state = setup
    # A NaN temperature makes the loss and every gradient NaN. (Poisoning the batch instead would need
    # float32 images: another input type, so another compile of the whole step for this one test.)
    t_sharding = training.state_shardings.params["t"]
    poisoned = state.replace(params={**state.params, "t": jax.device_put(jnp.float32(np.nan), t_sharding)})
    new_state, metrics = _step(training, batch, poisoned)
    assert int(metrics["nonfinite"]) == 1
    assert int(new_state.step) == int(state.step) + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params), jax.device_get(poisoned.params))
    # The skipped update did not advance the optimizer: the next step applies the first step's rate.
    assert int(optim.update_count(new_state.opt_state)) == 0
    new_state = new_state.replace(params={**new_state.params, "t": state.params["t"]})
    resumed_state, metrics = _step(training, batch, new_state)
    assert int(metrics["nonfinite"]) == 0
    assert float(metrics["learning_rate"]) == pytest.approx(float(training.schedule(0)))
    assert float(training.schedule(0)) != pytest.approx(float(training.schedule(1)))
    assert int(resumed_state.step) == 2 and int(optim.update_count(resumed_state.opt_state)) == 1


def test_frozen_tower_does_not_move(setup):
    _, _, training, batch, state = setup
    before = jax.device_get(state.params)
    new_state, _ = _step(training, batch, state)
    after = jax.device_get(new_state.params)
    jax.tree.map(np.testing.assert_array_equal, after["img"], before["img"])
    assert not np.allclose(after["txt"]["head"]["kernel"], before["txt"]["head"]["kernel"])


def test_unknown_frozen_group_is_refused():
    config = tiny_config(**{"optim.frozen": ("image",)})
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    with pytest.raises(ValueError, match=r"optim.frozen names \['image'\].*valid: \['b', 'img', 't', 'txt'\]"):
        optimizer.init({"img": jnp.ones(2), "txt": jnp.ones(2), "t": jnp.ones(()), "b": jnp.ones(())})


def test_accumulation_that_does_not_divide_the_device_batch_is_refused(setup):
    _, mesh, training, _, _ = setup
    rules = training.axis_rules
    with pytest.raises(ValueError, match="accum_steps=3 does not divide the per-device batch of 4"):
        sharding.check_accumulation(16, 3, mesh, rules)
