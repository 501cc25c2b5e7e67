"""Resume past an unreadable checkpoint, to the end of the run: each way of breaking the latest step is
set aside (kept under checkpoints/broken/), the run continues from the previous complete step, and every
step after the fallback is bitwise equal to an uninterrupted run."""
import json
import logging
import os
import shutil

import pytest

from siglip_jax.io import checkpoint
from siglip_jax.training import trainer
from tests.helpers import tiny_config

TOTAL_STEPS = 8
KILLED_AFTER = 6  # the copied workdir looks like a run killed right after saving this step


def _config():
    config = tiny_config()
    config.total_steps = TOTAL_STEPS
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 10
    config.tensorboard = False
    config.log_batch_checksums = True
    config.data.prefetch_batches = 1
    return config


def _losses(workdir):
    """{step: (loss, batch checksum)}, the last line of each step."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        for line in stream:
            entry = json.loads(line)
            by_step[entry["step"]] = (entry["loss"], entry["data/batch_crc32"])
    return by_step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, saving every 2 steps and keeping them all."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    trainer.train(_config(), workdir)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    return workdir, losses


def _empty(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _truncate_array_file(step_dir):
    data = os.path.join(step_dir, "state", "d")  # the merged OCDBT data that a restore reads
    for name in os.listdir(data):
        with open(os.path.join(data, name), "r+b") as file:
            file.truncate(os.path.getsize(file.name) // 2)


BREAKAGES = {
    "truncated array file": lambda root: _truncate_array_file(os.path.join(root, "6")),
    "missing manifest": lambda root: os.remove(os.path.join(root, "6", "state", "manifest.ocdbt")),
    "missing data state": lambda root: os.remove(os.path.join(root, "6", "data", "process_0-of-1.json")),
    "missing config metadata": lambda root: os.remove(os.path.join(root, "6", "config", "metadata")),
    "emptied step folder": lambda root: _empty(os.path.join(root, "6")),
    "the two latest emptied": lambda root: (_empty(os.path.join(root, "6")), _empty(os.path.join(root, "4"))),
}
RESUMED_FROM = {"the two latest emptied": 2}


@pytest.mark.slow
@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_rerun_continues_past_a_broken_latest_checkpoint(reference, breakage, tmp_path, caplog):
    """Slow: the first case pays the module's reference run (60 s under two workers: 8 steps saved every 2,
    often the session's first compile of tiny_config's step); every case reruns the trainer on a copy."""
    reference_dir, reference_losses = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    root = os.path.join(workdir, "checkpoints")
    for step in range(KILLED_AFTER + 2, TOTAL_STEPS + 1, 2):  # the steps a killed run had not saved yet
        shutil.rmtree(os.path.join(root, str(step)))
    BREAKAGES[breakage](root)
    resumed_from = RESUMED_FROM.get(breakage, KILLED_AFTER - 2)

    with caplog.at_level(logging.WARNING):
        trainer.train(_config(), workdir)  # the same command again; returning is exit 0

    log = "\n".join(record.getMessage() for record in caplog.records)
    assert f"Resumed from step {resumed_from} " in log
    broken = sorted(os.listdir(os.path.join(root, checkpoint.BROKEN_SUBDIR)))
    set_aside = [step for step in (4, 6) if step > resumed_from]
    assert [name.split(".")[0] for name in broken] == [str(step) for step in set_aside], broken
    for step in set_aside:
        assert f"Moved the checkpoint of step {step} aside" in log
    losses = _losses(workdir)
    for step in range(resumed_from + 1, TOTAL_STEPS + 1):
        assert losses[step] == reference_losses[step], f"step {step} differs from the uninterrupted run"
    assert checkpoint.latest_step(workdir) == TOTAL_STEPS


def test_eval_and_export_load_the_newest_readable_step_and_say_so(reference, tmp_path, caplog):
    """loading.load_model (eval.py, export.py, init_from) falls back as training does; with every step
    unreadable it is one error naming each step and the fix, not a page of TensorStore specs."""
    import jax
    import numpy as np

    from siglip_jax.io import loading

    reference_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    root = os.path.join(workdir, "checkpoints")
    _truncate_array_file(os.path.join(root, "8"))
    with caplog.at_level(logging.WARNING):
        loaded = loading.load_model(workdir)
    expected = loading.load_model(reference_dir, step=6)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, expected.params)
    assert "Could not read the newer checkpoint(s)" in caplog.text and f"step 8 ({root}/8/state" in caplog.text
    assert "using step 6, the newest that reads" in caplog.text
    for step in (2, 4, 6):
        _truncate_array_file(os.path.join(root, str(step)))
    with pytest.raises(checkpoint.NoCheckpointError) as error:
        loading.load_model(workdir)
    message = str(error.value)
    assert all(f"step {step} ({root}/{step}/state" in message for step in (2, 4, 6, 8)), message
    assert message.endswith("Delete those step directories, or start a new workdir.") and len(message) < 2000


def test_a_run_whose_every_checkpoint_is_unreadable_says_which_steps_and_files_and_the_fix(reference, tmp_path):
    reference_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    root = os.path.join(workdir, "checkpoints")
    for step in (2, 4, 6, 8):
        _truncate_array_file(os.path.join(root, str(step)))
    with pytest.raises(checkpoint.NoCheckpointError) as error:
        trainer.train(_config(), workdir)
    message = str(error.value)
    assert "\n" not in message and len(message) < 2500, message
    for step in (2, 4, 6, 8):
        assert f"step {step} ({root}/{step}/state" in message, message  # the step and the file that failed
    assert message.endswith(f"Delete those step directories under {root} (or move them elsewhere) to start this "
                            "workdir again, or start a new workdir.")
    assert "optimizer" not in message  # the optimizer is not what changed


def test_a_changed_optimizer_structure_is_named_instead_of_damage(reference, tmp_path):
    reference_dir, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    config = _config()
    config.optim.grad_clip_norm = 0.0  # no clipping: the optimizer state loses the clip's entry
    with pytest.raises(checkpoint.NoCheckpointError, match=r"changed the optimizer's structure \(optim.grad_clip_norm: "
                                                           r"1.0 -> 0.0\).*--config.init_from="):
        trainer.train(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6", "8"]  # nothing set aside
