"""FSDP really shards: parameter and optimizer memory per device. (The loss trajectory on data, FSDP and
tensor meshes is tests/test_train_step.py's, beside the sharded step it reuses.)"""
import jax

from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from siglip_jax.training import optim
from siglip_jax.training.train_step import state_initialiser
from tests.helpers import tiny_config


def test_fsdp_divides_parameter_and_optimizer_memory():
    config = tiny_config()
    config.model.image.width = config.model.text.width = 64
    model = two_towers.build_model(config.model)
    optimizer = optim.build_optimizer(config.optim, 10)
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)

    def bytes_per_device(mesh_shape):
        mesh = sharding.create_mesh(mesh_shape, ("data", "fsdp", "tensor"))
        init_state, _, _ = state_initialiser(model, optimizer, image_shape=(16, 16, 3), text_length=12, mesh=mesh,
                                             axis_rules=rules)
        state = init_state(jax.random.key(0))
        leaves = jax.tree.leaves((state.params, state.opt_state))
        total = sum(leaf.nbytes for leaf in leaves)
        device = jax.devices()[0]
        on_device = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards if shard.device == device)
        return total, on_device

    total, replicated = bytes_per_device((8, 1, 1))
    assert replicated == total  # pure data parallelism keeps a full copy per device
    total, sharded = bytes_per_device((1, 8, 1))
    assert sharded < 1.15 * total / 8, (sharded, total / 8)  # norms, t and b stay replicated
