"""A workdir written before the package moved into layers (issue 27) still loads and resumes.

tests/data/workdir_before_layout was written by commit 44ba734, the last before the move, on one CPU device:
`trainer.train(tiny_config(optim.name="sgd", optim.b1=0, optim.learning_rate=0.5, optim.ema_decay=0.9)`
with total_steps=2, checkpoint_every_steps=2, keep_checkpoints=1, no evals, no TensorBoard). Its saved
config still holds `loss.bidirectional`, a key removed since. params_raw.npz and params_ema.npz hold what
that commit's own `loading.load_model(workdir, weights=...)` read back: the reference is the old code."""
import os
import re
import shutil

import jax
import numpy as np
import pytest

from siglip_jax.io import loading
from siglip_jax.training import trainer
from tests.helpers import tiny_config

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "workdir_before_layout")


def _flat(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture
def workdir(tmp_path):
    return shutil.copytree(os.path.join(FIXTURE, "workdir"), tmp_path / "workdir")


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_old_workdir_loads_the_same_parameters(workdir, weights):
    loaded = _flat(loading.load_model(str(workdir), weights=weights).params)
    expected = dict(np.load(os.path.join(FIXTURE, f"params_{weights}.npz")))
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_old_workdir_resumes(workdir, caplog):
    config = tiny_config(**{"optim.name": "sgd", "optim.b1": 0.0, "optim.learning_rate": 0.5, "optim.ema_decay": 0.9})
    config.total_steps, config.checkpoint_every_steps, config.keep_checkpoints = 3, 3, 1
    config.tensorboard, config.evals = False, {}
    with caplog.at_level("INFO"):
        trainer.train(config, str(workdir))
    assert re.search(r"Resumed from step 2\b", caplog.text), caplog.text[-2000:]
    steps = [int(s) for s in re.findall(r'"step": (\d+)', (workdir / "metrics.jsonl").read_text())]
    assert steps == [1, 2, 3]
