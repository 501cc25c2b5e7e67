"""Run by tests/test_multihost.py as N OS processes joined by jax.distributed: the evals of
tests/multihost_recipe.py on one checkpoint of a workdir, through the one runner (as the trainer and
eval.py run them), with each eval source counting the records this process read. Writes
OUTPUT.process<i>.json: {"metrics": ..., "read": {eval name: [record indices]}}.

python tests/multihost_eval.py --workdir W --step 3 --output O --local_device_count 4 --num_processes 2 ...
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from siglip_jax.runtime import distributed  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Its checkpoint step.")
_OUTPUT = flags.DEFINE_string("output", None, "Prefix of the per-process JSON results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_integer("local_device_count", None, "CPU devices of this process.")


class _CountingSource:
    """An eval source that records which indices this process read."""

    def __init__(self, inner, read):
        self.inner, self.read = inner, read

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        self.read.append(int(index))
        return self.inner[index]


def main(argv):
    del argv
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICES.value)
    import jax

    from siglip_jax.data.from_config import build_source, build_tokenizer
    from siglip_jax.evaluation import runner
    from siglip_jax.inference.embedder import Embedder
    from siglip_jax.io import loading
    from siglip_jax.models import two_towers
    from siglip_jax.runtime import sharding
    from tests import multihost_recipe

    config = multihost_recipe.get_config()
    mesh = sharding.create_mesh(config.mesh.shape, config.mesh.axis_names)
    rules = sharding.rules_as_tuples(config.mesh.axis_rules)
    shardings = two_towers.param_shardings(config.model, mesh, rules)
    params = loading.load_model(_WORKDIR.value, step=_STEP.value, shardings=shardings).params
    read: dict[str, list[int]] = {}

    def counting_source(entry):  # build_evaluators builds the sources in config.evals order
        name = list(config.evals)[len(read)]
        return _CountingSource(build_source(entry), read.setdefault(name, []))

    evaluators = runner.build_evaluators(config, build_tokenizer(config), counting_source)
    embedder = Embedder(two_towers.build_model(config.model), mesh, rules, config.data.eval_batch_size, shardings)
    metrics = runner.run_evaluators(evaluators, embedder, params)
    with open(f"{_OUTPUT.value}.process{jax.process_index()}.json", "w") as stream:
        json.dump({"metrics": metrics, "read": read}, stream)


if __name__ == "__main__":
    app.run(main)
