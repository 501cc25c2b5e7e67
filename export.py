"""Export a trained model: python export.py --format hf|stablehlo|params --output OUT
    (--workdir W [--checkpoint STEP] [--weights ema] | --checkpoint PATH) [--dtype bfloat16]

--checkpoint PATH reads an exported params file, an HF SigLIP directory or a big_vision .npz, so this also
converts between formats (e.g. a released .npz to HF).
"""
import dataclasses

from absl import app, flags
from ml_collections import config_flags

from siglip_jax import config as config_lib
from siglip_jax.io import formats, loading
from siglip_jax.runtime import cli, compilation_cache
from siglip_jax.training import metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe the workdir was trained with (workdir case).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to export from.")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "With --workdir: the step (default: latest). Alone: a path to an exported params file, "
    "an HF SigLIP directory or a big_vision .npz.")
_FORMAT = flags.DEFINE_enum("format", None, formats.FORMATS, "What to write.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (hf, stablehlo) or file (params).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype: float32 or bfloat16 (hf also float16).")
_PLATFORMS = flags.DEFINE_list("platforms", None, "stablehlo: platforms to lower for, e.g. cpu,cuda,tpu "
                               "(default: the one JAX runs on).")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", config_lib.WEIGHTS, "With a workdir: the trained parameters (raw) or "
                              "their exponential moving average (ema; the run needs optim.ema_decay > 0).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into a non-empty --output directory (or over an existing "
                                "params file), replacing files of the same names.")
_WITH_DECODER = flags.DEFINE_bool("with_decoder", False, "--format params: keep SigLIP 2's caption decoder "
                                  "(model.decoder) beside the two towers; every format writes the towers only otherwise.")
flags.mark_flags_as_required(["format", "output"])


def main(argv):
    del argv
    metrics.quiet_library_logs()
    compilation_cache.enable(_COMPILATION_CACHE.value, _WORKDIR.value)
    try:
        source, step = loading.source_from_flags(_WORKDIR.value, _CHECKPOINT.value)
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error
    exported = loading.load_model(source, step=step, weights=_WEIGHTS.value)
    exported = dataclasses.replace(exported, config=loading.with_overrides(exported.config, _CONFIG.value))
    formats.export_model(exported, _FORMAT.value, _OUTPUT.value, _DTYPE.value, _PLATFORMS.value, _OVERWRITE.value,
                         with_decoder=_WITH_DECODER.value)
    print(f"wrote {_FORMAT.value} export to {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run_absl(main)
