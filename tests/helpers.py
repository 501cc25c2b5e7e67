"""Small configs shared by tests: tiny towers so every compile takes seconds on two CPU cores."""
from siglip_jax.config import default_config, source_config


def tiny_config(depth: int = 1, **overrides):
    """`depth` blocks per tower: 1 compiles a train step in about two thirds of the time 2 takes (14.5 s
    against 22 s on the 2-core machine); tests of layer layouts (scanned or unrolled, HF and big_vision
    names, per-layer rules) ask for 2, so that block 0 and block 1 differ."""
    config = default_config()
    config.total_steps = 4
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.model.image.variant = "mu/4"
    config.model.image.image_size = 16
    config.model.image.width = 32
    config.model.image.num_heads = 2
    config.model.image.depth = depth
    config.model.image.mlp_dim = 64  # below big_vision's mu (128): faster compiles
    config.model.text.variant = "mu"
    config.model.text.vocab_size = 259
    config.model.text.max_len = 12
    config.model.text.depth = depth
    config.model.text.mlp_dim = 64
    config.optim.warmup_steps = 0  # a nonzero first learning rate, so one step moves the parameters
    # Constant, so the compiled step does not depend on total_steps: runs of 1, 2, 8 or 40 steps share one
    # program, which the session's compilation cache (tests/conftest.py) then loads instead of compiling.
    config.optim.schedule = "constant"
    config.optim.learning_rate = 1e-3
    config.data.batch_size = 16
    config.data.eval_batch_size = 16
    config.data.train = source_config("demo", split="train", size=256, image_size=16)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config
