"""Gradient accumulation (GradCache), frozen towers and the non-finite guard."""
import functools

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import optim, sharding
from siglip_jax.models import two_towers
from siglip_jax.train_step import create_train_state, loss_and_grads, train_step
from tests.helpers import tiny_config

MESH_SHAPE = (4, 1, 1)  # 16 examples: 4 per device, split into 2 or 4 microbatches


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    mesh = sharding.create_mesh(MESH_SHAPE, ("data", "fsdp", "tensor"), jax.devices()[:4])
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    state, shardings = create_train_state(
        model, optimizer, image_size=16, text_length=12, mesh=mesh, axis_rules=rules, rng=jax.random.key(0)
    )
    rng = np.random.default_rng(1)
    batch = {
        "images": rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8),
        "tokens": rng.integers(3, 259, (16, 12)).astype(np.int32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, rules))
    return config, mesh, rules, model, optimizer, state, shardings, batch


def _grads(setup, accum_steps):
    config, mesh, rules, model, _, state, shardings, batch = setup

    @jax.jit
    def run(params, batch):
        with nn.logical_axis_rules(rules):
            return loss_and_grads(
                params, batch, model=model, loss_config=config.loss, mesh=mesh,
                batch_axes=sharding.batch_axes(mesh, rules), accum_steps=accum_steps,
            )

    with jax.set_mesh(mesh):
        return jax.device_get(run(state.params, batch))


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_accumulated_gradient_equals_full_batch_gradient(setup, accum_steps):
    reference_loss, reference_grads = _grads(setup, 1)
    loss, grads = _grads(setup, accum_steps)
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-6)
    flat_reference = jax.tree.leaves(reference_grads)
    scale = max(float(np.max(np.abs(g))) for g in flat_reference)
    for got, want in zip(jax.tree.leaves(grads), flat_reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def _step(setup, batch, state=None, optimizer=None, **kwargs):
    config, mesh, rules, model, default_optimizer, default_state, shardings, _ = setup
    optimizer = optimizer or default_optimizer
    state = state or default_state
    schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
    step = jax.jit(functools.partial(
        train_step, model=model, optimizer=optimizer, schedule=schedule, loss_config=config.loss,
        axis_rules=rules, mesh=mesh, batch_axes=sharding.batch_axes(mesh, rules), **kwargs,
    ))
    with jax.set_mesh(mesh):
        return step(jax.tree.map(jnp.copy, state), batch)


def test_nonfinite_step_is_skipped_and_reported(setup):
    _, _, _, _, _, state, _, batch = setup
    poisoned = dict(batch, images=batch["images"].astype(jnp.float32) * jnp.nan)
    new_state, metrics = _step(setup, poisoned)
    assert int(metrics["nonfinite"]) == 1
    assert int(new_state.step) == int(state.step) + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params), jax.device_get(state.params))
    _, metrics = _step(setup, batch)
    assert int(metrics["nonfinite"]) == 0


def test_frozen_tower_does_not_move(setup):
    config, _, _, _, _, state, _, batch = setup
    config = tiny_config(**{"optim.frozen": ("img",)})
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    frozen_state = state.replace(opt_state=optimizer.init(state.params))
    new_state, _ = _step(setup, batch, state=frozen_state, optimizer=optimizer, frozen=("img",))
    before, after = jax.device_get(state.params), jax.device_get(new_state.params)
    jax.tree.map(np.testing.assert_array_equal, after["img"], before["img"])
    assert not np.allclose(after["txt"]["head"]["kernel"], before["txt"]["head"]["kernel"])


def test_unknown_frozen_group_is_refused():
    config = tiny_config(**{"optim.frozen": ("image",)})
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    with pytest.raises(ValueError, match=r"optim.frozen names \['image'\].*valid: \['b', 'img', 't', 'txt'\]"):
        optimizer.init({"img": jnp.ones(2), "txt": jnp.ones(2), "t": jnp.ones(()), "b": jnp.ones(())})


def test_accumulation_that_does_not_divide_the_device_batch_is_refused(setup):
    _, mesh, rules, *_ = setup
    with pytest.raises(ValueError, match="accum_steps=3 does not divide the per-device batch of 4"):
        sharding.check_accumulation(16, 3, mesh, rules)
