"""A tiny recipe for tests/test_multihost.py, run as 1 process x 8 CPU devices and as 2 processes x 4:
python train.py --config tests/multihost_recipe.py --workdir W [--num_processes 2 ...]"""
from siglip_jax.config import eval_config, source_config
from tests.helpers import tiny_config


def get_config(arg: str | None = None):
    config = tiny_config()
    config.total_steps = 3
    # The trajectory this comparison was built on; big_vision's stronger default decay leaves near-ties in
    # the 24-item eval that 1e-7 differences between the launches flip.
    config.optim.weight_decay_convention = "optax"
    config.log_every_steps = 1  # every step's loss, to compare the two launches step by step
    config.mesh.shape = (-1, 2, 1)  # data x fsdp: parameters sharded across devices of both processes
    config.data.random_crop_scale = (0.5, 1.0)  # augmentation on: it must not depend on the process count
    config.data.random_flip = True
    config.data.prefetch_batches = 1
    config.checkpoint_every_steps = 0  # saved once, at the end: every process writes its shards
    config.tensorboard = False
    config.evals.retrieval = eval_config(  # at the end: each process reads and embeds its 12 of the 24 records
        "retrieval", source_config("demo", split="eval", size=24, image_size=16)
    )
    config.data.eval_batch_size = 16  # 8 rows per process per batch: a full batch, then one half padding
    return config
