"""Train a SigLIP / CLIP model: python train.py --config configs/demo.py --workdir /tmp/demo"""
from absl import app, flags
from ml_collections import config_flags

from siglip_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
