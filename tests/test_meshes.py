"""Training on data, FSDP and tensor meshes: same trajectory, parameters really sharded."""
import json

import jax
import numpy as np
import pytest

from siglip_jax import optim, sharding, trainer
from siglip_jax.models import two_towers
from siglip_jax.train_step import create_train_state
from tests.helpers import tiny_config


def _losses(tmp_path, mesh_shape):
    config = tiny_config()
    config.total_steps = 5
    config.mesh.shape = mesh_shape
    config.tensorboard = False
    config.model.image.width = config.model.text.width = 64
    config.model.image.num_heads = config.model.text.num_heads = 4
    config.model.image.mlp_dim = config.model.text.mlp_dim = 128
    workdir = tmp_path / "x".join(map(str, mesh_shape))
    trainer.train(config, str(workdir))
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.mark.slow
def test_five_step_loss_trajectory_is_the_same_on_every_mesh(tmp_path):
    """Slow (~1-2 min on 2 cores): three whole runs of the trainer, each compiling its step for another
    mesh (a program per mesh is the point)."""
    reference = _losses(tmp_path, (8, 1, 1))
    assert len(reference) == 5
    for mesh_shape in [(2, 4, 1), (2, 2, 2)]:
        np.testing.assert_allclose(_losses(tmp_path, mesh_shape), reference, rtol=1e-5)


def test_fsdp_divides_parameter_and_optimizer_memory():
    config = tiny_config()
    config.model.image.width = config.model.text.width = 64
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, 10)
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)

    def bytes_per_device(mesh_shape):
        mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"))
        state, _ = create_train_state(model, optimizer, image_size=16, text_length=12, mesh=mesh,
                                      axis_rules=rules, rng=jax.random.key(0))
        leaves = jax.tree.leaves((state.params, state.opt_state))
        total = sum(leaf.nbytes for leaf in leaves)
        device = jax.devices()[0]
        on_device = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards if shard.device == device)
        return total, on_device

    total, replicated = bytes_per_device((8, 1, 1))
    assert replicated == total  # pure data parallelism keeps a full copy per device
    total, sharded = bytes_per_device((1, 8, 1))
    assert sharded < 1.15 * total / 8, (sharded, total / 8)  # norms, t and b stay replicated
