"""Evaluate a checkpoint: zero-shot retrieval and classification as listed in the config's evals, and
SigLIP match probabilities for given image-text pairs.

    python eval.py --config configs/flickr8k.py --workdir /tmp/flickr8k [--checkpoint STEP] --output metrics.json
    python eval.py --config configs/flickr8k.py --checkpoint model.msgpack   # an exported params file, HF dir or .npz
    python eval.py --workdir /tmp/demo --pairs pairs.jsonl    # {"image": path, "text": "..."} per line
    python eval.py --workdir /tmp/run --weights ema           # the parameters' moving average (optim.ema_decay)
"""
from absl import flags
from ml_collections import config_flags

from siglip_jax import config as config_lib
from siglip_jax.evaluation import command
from siglip_jax.runtime import cli, compilation_cache
from siglip_jax.training import metrics

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose `evals` to run (default: the checkpoint's own config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir: evaluates its latest checkpoint.")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, compilation_cache.FLAG_HELP)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "With --workdir: a step or 'latest'. Alone: an exported params file, HF directory or .npz.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the metrics (and pair scores) to this JSON file.")
_WEIGHTS = flags.DEFINE_enum("weights", "raw", config_lib.WEIGHTS, "With a workdir: the trained parameters (raw) or "
                              "their exponential moving average (ema; the run needs optim.ema_decay > 0).")
_PAIRS = flags.DEFINE_string("pairs", None, "JSONL of {\"image\": path, \"text\": caption}: print their match probabilities.")


def main(argv):
    del argv
    metrics.quiet_library_logs()
    compilation_cache.enable(_COMPILATION_CACHE.value, _WORKDIR.value)
    results = command.run(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _PAIRS.value, _WEIGHTS.value)
    print(results.pop("table"))
    if _OUTPUT.value:
        command.write_output(results, _OUTPUT.value)
        print(f"Wrote {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run_absl(main)
