"""Resume and preemption, end to end: `python train.py` in a subprocess, killed (SIGKILL) or asked to stop
(SIGTERM), then the same command again, compared step by step with one uninterrupted run of the recipe.

The soak kills one run 10 times at seeded moments, every other kill while a checkpoint is being written
and the others 1-3 steps after a checkpoint completed (which is also what a single kill after a save
tests: that case was a test of its own until 2026-12-06, docs/testing.md). Each kill costs a whole
train.py start, so the kills alternate between the two moments instead of drawing them."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from siglip_jax.io import checkpoint
from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")  # 40 steps, checkpoints every 10
TOTAL_STEPS = 40
RUN_TIMEOUT_S = 600  # the first run compiles cold: 240 s ran out on the shared 2-core machine at load ~20


def _start(workdir, *overrides, recipe=RECIPE):
    # os.environ carries the session's compilation cache (tests/conftest.py): every run after the first
    # loads the compiled step instead of compiling it again
    env = child_environment()
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={recipe}", f"--workdir={workdir}", *overrides]
    with open(workdir + ".log", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process, workdir, timeout=RUN_TIMEOUT_S):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own process group only
        process.wait()
        pytest.fail(f"train.py did not finish within {timeout} s; see {workdir}.log")


def _run(workdir, recipe=RECIPE):
    returncode = _finish(_start(workdir, recipe=recipe), workdir)
    assert returncode == 0, f"train.py failed with {returncode}; see {workdir}.log"


def _wait_for(condition, process, workdir, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"train.py exited ({process.returncode}) before the test could interrupt it; see {workdir}.log")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"Timed out waiting on train.py; see {workdir}.log")
        time.sleep(0.02)


def _metrics_by_step(workdir):
    """The last line logged for each step (a resumed run logs again the steps after its checkpoint)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    by_step = {}
    with open(path) as stream:
        for line in stream:
            if line.endswith("\n"):  # a line being written when the process was killed is incomplete
                entry = json.loads(line)
                by_step[entry["step"]] = entry
    return by_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """{step: metrics} of the recipe run once without interruption: the reference of every test here."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    os.makedirs(workdir)
    _run(workdir)
    metrics = _metrics_by_step(workdir)
    assert sorted(metrics) == list(range(1, TOTAL_STEPS + 1))
    return metrics


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    process = _start(workdir)
    _wait_for(lambda: max(_metrics_by_step(workdir), default=0) >= 5, process, workdir)
    process.send_signal(signal.SIGTERM)
    assert _finish(process, workdir) == 0
    stopped_at = max(_metrics_by_step(workdir))
    assert 5 <= stopped_at < TOTAL_STEPS
    assert checkpoint.latest_step(workdir) == stopped_at
    log = open(workdir + ".log").read()
    assert f"Preempted: saved step {stopped_at}" in log
    for step in range(1, stopped_at + 1):
        assert _metrics_by_step(workdir)[step]["loss"] == uninterrupted[step]["loss"]


NUM_KILLS = 10
# Checkpoints every 2 steps, so 40 steps give 10 kills 4 steps each. The cadence does not change what is
# trained: the steps' losses are those of the uninterrupted run, which saves every 10.
SOAK_OVERRIDES = ("--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2", "--config.tensorboard=False")


def _complete_steps(workdir):
    """Checkpoints Orbax has committed: it renames a step's directory into place only when complete."""
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(root) if name.isdigit()) if os.path.isdir(root) else []


def _mtime_ns(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


def _saving(workdir):
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any("orbax-checkpoint-tmp" in name for name in os.listdir(root))


def _wait_for_kill_moment(process, workdir, kill, resumed_from, before, during_save, steps_ahead, rng, deadline):
    while True:
        assert process.poll() is None, f"kill {kill}: train.py exited ({process.returncode}) before its kill"
        assert time.monotonic() < deadline, f"kill {kill}: no progress; see {workdir}.log"
        # Until this run first writes metrics.jsonl, the lines in it are the killed run's.
        done = max(_metrics_by_step(workdir), default=0) if _mtime_ns(workdir) != before else 0
        if during_save and done > resumed_from and _saving(workdir):
            break
        # A kill only after this run completed a new checkpoint (then 1-3 more steps), so the run advances.
        if not during_save and max(_complete_steps(workdir), default=0) > resumed_from and done >= max(_complete_steps(workdir)) + steps_ahead:
            time.sleep(rng.uniform(0, 0.3))
            break
        time.sleep(0.002)


@pytest.mark.slow
def test_ten_sigkills_then_the_same_losses_as_uninterrupted(uninterrupted, tmp_path):
    """Slow (76-108 s under two workers, 2026-12-06): 11 train.py starts, each a Python + JAX start-up and a restore; the point
    is many kills at different moments of one run."""
    workdir = str(tmp_path / "killed")
    rng = random.Random(18)
    kills_during_save = 0
    for kill in range(NUM_KILLS):
        resumed_from = max(_complete_steps(workdir), default=0)
        before = _mtime_ns(workdir)
        process = _start(workdir, *SOAK_OVERRIDES)
        during_save = kill % 2 == 1
        steps_ahead = rng.randint(1, 3)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            _wait_for_kill_moment(process, workdir, kill, resumed_from, before, during_save, steps_ahead, rng, deadline)
        finally:  # also when an assertion fails: never leave a child training
            complete_before = _complete_steps(workdir)
            saving_at_kill = _saving(workdir)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kills_during_save += saving_at_kill
        # Nothing complete before the kill is lost: at worst the steps since the last complete save.
        assert max(_complete_steps(workdir), default=0) >= max(complete_before, default=0)
        assert max(_metrics_by_step(workdir)) < TOTAL_STEPS, "the run finished before its kill; raise TOTAL_STEPS"
    assert kills_during_save >= 2, f"only {kills_during_save} of the {NUM_KILLS // 2} kills meant for a save landed in one"

    last_complete = checkpoint.latest_step(workdir)
    assert last_complete, "no checkpoint survived the kills: the rerun below would not test a resume"
    assert _finish(_start(workdir, *SOAK_OVERRIDES), workdir) == 0, open(workdir + ".log").read()[-3000:]
    log = open(workdir + ".log").read()
    assert re.findall(r"Resumed from step (\d+) ", log)[-1:] == [str(last_complete)]
    assert not re.search("Could not read the newer checkpoint|Moved the checkpoint", log), "a kill broke a checkpoint"
    resumed = _metrics_by_step(workdir)
    # Steps up to the last checkpoint were logged only by the killed runs: their lines are kept, not overwritten.
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        assert resumed[step]["data/batch_crc32"] == uninterrupted[step]["data/batch_crc32"], f"step {step}: another batch"
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], f"step {step}: loss differs"
        assert resumed[step]["ema/param_norm"] == uninterrupted[step]["ema/param_norm"], f"step {step}: EMA differs"
    assert checkpoint.latest_step(workdir) == TOTAL_STEPS


SIGLIP2_RECIPE = os.path.join(REPO, "tests", "siglip2_resume_recipe.py")  # decoder, SILC and TIPS, 24 steps


def _saved_state(workdir, step):
    path = os.path.join(workdir, checkpoint.CHECKPOINTS_SUBDIR, str(step), "state")
    return jax.device_get(ocp.PyTreeCheckpointer().restore(path))


@pytest.mark.slow
def test_siglip2_recipe_resumes_bitwise_after_sigkill(tmp_path):
    """Slow (three train.py starts, two compiles): killed after its first checkpoint, the rerun continues with
    the decoder, the distillation teacher, both centres and the weights' EMA as saved, so every later step and
    the final state equal an uninterrupted run's."""
    reference = str(tmp_path / "uninterrupted")
    os.makedirs(reference)
    _run(reference, recipe=SIGLIP2_RECIPE)
    uninterrupted = _metrics_by_step(reference)
    total_steps = 24
    assert sorted(uninterrupted) == list(range(1, total_steps + 1))
    # The self-supervised losses join at start_fraction 0.125 x 24 = 3 updates done, i.e. in logged step 4,
    # the step of the first checkpoint, so it holds centres that have moved.
    for name in ("self_distillation_loss", "masked_prediction_loss"):
        assert [step for step in range(1, 6) if uninterrupted[step][name] > 0] == [4, 5], name
    assert uninterrupted[1]["caption_loss"] > 0

    workdir = str(tmp_path / "killed")
    os.makedirs(workdir)
    process = _start(workdir, recipe=SIGLIP2_RECIPE)
    try:
        _wait_for(lambda: bool(_complete_steps(workdir)), process, workdir)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert max(_metrics_by_step(workdir)) < total_steps, "the run finished before its kill"
    resumed_from = checkpoint.latest_step(workdir)
    assert resumed_from is not None and resumed_from >= 4
    assert _finish(_start(workdir, recipe=SIGLIP2_RECIPE), workdir) == 0, open(workdir + ".log").read()[-3000:]
    assert re.findall(r"Resumed from step (\d+) ", open(workdir + ".log").read()) == [str(resumed_from)]
    resumed = _metrics_by_step(workdir)
    names = ("loss", "caption_loss", "self_distillation_loss", "masked_prediction_loss", "ema/param_norm",
             "data/batch_crc32")
    for step in range(resumed_from + 1, total_steps + 1):
        for name in names:
            assert resumed[step][name] == uninterrupted[step][name], f"step {step}: {name} differs"
    final, expected = _saved_state(workdir, total_steps), _saved_state(reference, total_steps)
    assert {"teacher", "center", "patch_center"} <= set(final["distill"]) and "dec" in final["params"]
    assert np.any(final["distill"]["center"] != 0), "the centres never moved: the test would not see them resumed"
    jax.tree.map(np.testing.assert_array_equal, final, expected)
