"""Shared set-up for the benches: simulated devices before JAX starts, and a compiled train step."""
from __future__ import annotations

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
    """(compiled step, state, batch, mesh) for `config` on the first prod(mesh_shape) devices: the
    trainer's own step from train_step.build_training (frozen towers, accumulation and all)."""
    import jax
    import ml_collections
    import numpy as np

    from siglip_jax.runtime import sharding
    from siglip_jax.training.train_step import build_training

    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"), devices)
    if batch_size:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.batch_size = batch_size
    training = build_training(config, mesh)
    size, length = config.model.image.image_size, config.model.text.max_len
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (config.data.batch_size, size, size, 3)).astype(np.uint8),
        "tokens": rng.integers(3, config.model.text.vocab_size, (config.data.batch_size, length)).astype(np.int32),
    }, training.batch_sharding)
    state = training.init_state(jax.random.key(config.seed))
    with jax.set_mesh(mesh):
        compiled = training.step.lower(state, batch).compile()
    return compiled, state, batch, mesh
