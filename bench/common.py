"""Shared set-up for the benches: simulated devices before JAX starts, and a compiled train step."""
from __future__ import annotations

import functools
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def simulate_cpu_devices(count: int) -> None:
    """Must run before JAX initialises its backends."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    import jax

    jax.config.update("jax_num_cpu_devices", count)


def compiled_train_step(config, mesh_shape=(1, 1, 1), batch_size=None):
    """(compiled step, state, batch) for `config` on the first prod(mesh_shape) devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from siglip_jax import optim, sharding
    from siglip_jax.models import two_towers
    from siglip_jax.train_step import create_train_state, train_step

    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, config.total_steps)
    size, length = config.model.image.image_size, config.model.text.max_len
    state, shardings = create_train_state(model, optimizer, image_size=size, text_length=length, mesh=mesh,
                                          axis_rules=rules, rng=jax.random.key(0))
    batch_size = batch_size or config.data.batch_size
    batch_sharding = sharding.batch_sharding(mesh, rules)
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
        "tokens": rng.integers(3, config.model.text.vocab_size, (batch_size, length)).astype(np.int32),
    }, batch_sharding)
    step = jax.jit(
        functools.partial(
            train_step, model=model, optimizer=optimizer, schedule=optim.learning_rate_schedule(config.optim, config.total_steps),
            loss_config=config.loss, axis_rules=rules, mesh=mesh, batch_axes=sharding.batch_axes(mesh, rules),
            accum_steps=config.accum_steps,
        ),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    del jnp
    return compiled, state, batch, mesh
