"""A tiny recipe for the subprocess resume and preemption tests (tests/test_resume.py):
python train.py --config tests/resume_recipe.py --workdir W"""
from tests.helpers import tiny_config


def get_config(arg: str | None = None):
    if arg:  # "--config=tests/resume_recipe.py:<shard pattern>": the same run from streamed shards
        return get_shard_config(arg)
    config = tiny_config()
    config.total_steps = 40
    config.log_every_steps = 1  # every step's loss and batch checksum, to compare runs step by step
    config.log_batch_checksums = True
    config.checkpoint_every_steps = 10
    config.keep_checkpoints = 2
    config.data.prefetch_batches = 1
    config.optim.ema_decay = 0.9  # the EMA is part of the state that must resume bitwise ("ema/param_norm")
    return config


def get_shard_config(shards: str):
    """The same run reading streamed WebDataset shards (tests/test_streaming_resume.py); several patterns
    are separated by ";" (e.g. some shards in a gs:// bucket, some in an s3:// one)."""
    from siglip_jax.config import source_config

    config = get_config()
    patterns = shards.split(";")
    config.data.train = source_config("webdataset_stream", shards=patterns if len(patterns) > 1 else shards,
                                      shuffle_buffer=16, open_shards=2)
    return config
