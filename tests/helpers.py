"""Small configs shared by tests: tiny towers so every compile takes seconds on two CPU cores."""
import os

import numpy as np

from siglip_jax.config import default_config, source_config
from siglip_jax.data.tokenizers import ByteTokenizer


class OracleEmbedder:
    """A zero-shot oracle for evaluation.runner.ClassificationSet: an image embeds to the one-hot of the label
    params["record_labels"] gives its record (the key each chunk row carries), a prompt `template` to the
    one-hot of the class it names exactly (byte tokens of `max_len`). Records the size of each image chunk."""

    def __init__(self, class_names, template: str = "a photo of a {}.", max_len: int = 64):
        self.class_names, self.rows_per_process, self.chunk_sizes = list(class_names), 4, []
        self.prefix, self.suffix = template.split("{}")
        self.tokenizer = ByteTokenizer(max_len)

    def embed_shares(self, tower, params, local_chunks, empty_inputs, key_columns=1):
        assert tower == "image"
        embeddings, keys = [], []
        for inputs, chunk_keys in local_chunks:
            self.chunk_sizes.append(len(inputs))
            out = np.zeros((len(inputs), len(self.class_names)), np.float32)
            out[np.arange(len(inputs)), params["record_labels"][chunk_keys[:, 0]]] = 1.0
            embeddings.append(out)
            keys.append(chunk_keys)
        return np.concatenate(embeddings), np.concatenate(keys)

    def texts(self, params, tokens):
        out = np.zeros((len(tokens), len(self.class_names)), np.float32)
        for row, ids in enumerate(tokens):
            name = self.tokenizer.decode(ids).removeprefix(self.prefix).removesuffix(self.suffix)
            out[row, self.class_names.index(name)] = 1.0
        return out


def child_environment(device_count: int | None = 8, **extra: str) -> dict[str, str]:
    """os.environ for a child Python + JAX process: CPU only, `device_count` simulated devices (None: one,
    the platform's own), and the session's other XLA flags and compilation cache (tests/conftest.py) kept,
    so the children compile as cheaply as the pytest process and share its cached programs."""
    xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
                 if "xla_force_host_platform_device_count" not in flag]
    if device_count is not None:
        xla_flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return {**os.environ, "XLA_FLAGS": " ".join(xla_flags), "JAX_PLATFORMS": "cpu", **extra}


def tiny_config(depth: int = 1, **overrides):
    """`depth` 1, the default, is the cheapest step to compile: one block per tower and global-average
    pooling of the image tokens (the train step compiles in 9.6 s against 12.1 s with SigLIP's MAP head,
    and 22 s with two blocks and the head; quiet 2-core machine, docs/testing.md). `depth` 2 is SigLIP's
    layout in miniature, two blocks (so block 0 and block 1 differ) and the MAP head: for tests of layer
    layouts (scanned or unrolled, HF and big_vision names, per-layer rules) and of released checkpoints."""
    config = default_config()
    config.total_steps = 4
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.model.image.variant = "mu/4"
    config.model.image.image_size = 16
    config.model.image.width = 32
    config.model.image.num_heads = 2
    config.model.image.depth = depth
    config.model.image.pooling = "gap" if depth == 1 else "map"
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
