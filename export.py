"""Export a trained model: python export.py --format hf|stablehlo|params --output OUT
    (--workdir W [--checkpoint STEP] | --checkpoint PATH) [--dtype bfloat16]

--checkpoint PATH reads an exported params file, an HF SigLIP directory or a big_vision .npz, so this also
converts between formats (e.g. a released .npz to HF).
"""
import dataclasses
import os

from absl import app, flags
from ml_collections import config_flags

from siglip_jax import checkpoint, inference, metrics
from siglip_jax.export import formats

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe the workdir was trained with (workdir case).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export from.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "With --workdir: the step (default: latest). Alone: a path to an exported params file, "
    "an HF SigLIP directory or a big_vision .npz.")
_FORMAT = flags.DEFINE_enum("format", None, formats.FORMATS, "What to write.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (hf, stablehlo) or file (params).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype: float32 or bfloat16 (hf also float16).")
_PLATFORMS = flags.DEFINE_list("platforms", None, "stablehlo: platforms to lower for, e.g. cpu,cuda,tpu "
                               "(default: the one JAX runs on).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --output directory (or over an existing "
                                "params file), replacing files of the same names.")
flags.mark_flags_as_required(["format", "output"])


def main(argv):
    del argv
    metrics.quiet_library_logs()
    if _CHECKPOINT.value and os.path.exists(_CHECKPOINT.value) and not _WORKDIR.value:
        exported = inference.load_params(_CHECKPOINT.value)
    elif _WORKDIR.value:
        exported = inference.load_workdir_params(_WORKDIR.value, checkpoint.parse_step(_CHECKPOINT.value))
    else:
        raise app.UsageError("Pass --workdir (and optionally --checkpoint STEP), or --checkpoint PATH to an "
                             f"existing params file / HF directory / .npz (got {_CHECKPOINT.value!r}).")
    if _CONFIG.value is not None:
        exported = dataclasses.replace(exported, config=_CONFIG.value)
    formats.export_model(exported, _FORMAT.value, _OUTPUT.value, _DTYPE.value, _PLATFORMS.value, _OVERWRITE.value)
    print(f"wrote {_FORMAT.value} export to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
