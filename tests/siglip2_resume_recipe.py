"""SigLIP 2's recipe in miniature for the subprocess SIGKILL test (tests/test_resume.py): the caption decoder,
SILC and TIPS (on after 3 of the 24 updates) and the EMA of the weights, checkpoints every 4 steps.
python train.py --config tests/siglip2_resume_recipe.py --workdir W"""
from tests import resume_recipe


def get_config(arg: str | None = None):
    del arg
    config = resume_recipe.get_config()
    config.total_steps = 24  # the kill waits for the first checkpoint: 20 steps left to land it in
    config.checkpoint_every_steps = 4
    config.model.text.max_len = 32  # byte captions: the decoder needs the whole caption to predict
    config.model.decoder.weight = 1.0
    distill = config.model.distill
    distill.weight, distill.masked_weight, distill.start_fraction = 1.0, 0.25, 0.125
    distill.n_local, distill.prototypes, distill.head_bottleneck = 2, 32, 16
    config.data.random_crop_scale = (0.5, 1.0)
    return config
