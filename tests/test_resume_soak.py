"""Soak test of resume: one run SIGKILLed 10 times at seeded random moments, every other kill while a
checkpoint is being written and the others 1-3 steps after a checkpoint completed, rerun each time with
the same command. The final per-step losses are bitwise equal to an uninterrupted run, and no kill loses
a checkpoint that was complete before it.

Each kill costs a whole train.py start, so the kills alternate between the two moments instead of
drawing them (30% during a save): half the reruns of the 20 drawn kills this test once made, and more
kills during a save (5 tries, at least 2 asserted) than those 20 gave on average (6 tries, 1 asserted).
The run is the recipe's 40 steps, so its compiled step is the one tests/test_resume.py compiles and the
session's compilation cache (tests/conftest.py) already holds it."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from siglip_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")
NUM_KILLS = 10
TOTAL_STEPS = 40  # the recipe's; 4 steps per kill, as the 20 kills of 80 steps had
OVERRIDES = [f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=2",
             "--config.tensorboard=False"]
RUN_TIMEOUT_S = 600


def _start(workdir):
    # os.environ carries the session's compilation cache (tests/conftest.py): every rerun loads the
    # compiled step instead of compiling it again, seconds per rerun
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "train.py", f"--config={RECIPE}", f"--workdir={workdir}", *OVERRIDES]
    with open(workdir + ".log", "ab") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _metrics_by_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path) as stream:
            for line in stream:
                if line.endswith("\n"):  # a line cut by the kill is incomplete
                    entry = json.loads(line)
                    by_step[entry["step"]] = entry
    return by_step


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


def _wait(process, timeout=RUN_TIMEOUT_S):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail("train.py did not finish in time")


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
def test_ten_sigkills_then_the_same_losses_as_uninterrupted(tmp_path):
    reference = str(tmp_path / "uninterrupted")
    assert _wait(_start(reference)) == 0, open(reference + ".log").read()[-3000:]
    expected = _metrics_by_step(reference)
    assert sorted(expected) == list(range(1, TOTAL_STEPS + 1))

    workdir = str(tmp_path / "killed")
    rng = random.Random(18)
    kills_during_save = 0
    for kill in range(NUM_KILLS):
        resumed_from = max(_complete_steps(workdir), default=0)
        before = _mtime_ns(workdir)
        process = _start(workdir)
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
    assert _wait(_start(workdir)) == 0, open(workdir + ".log").read()[-3000:]
    log = open(workdir + ".log").read()
    assert re.findall(r"Resumed from step (\d+) ", log)[-1:] == ([str(last_complete)] if last_complete else [])
    assert not re.search("Could not read the newer checkpoint|Moved the checkpoint", log), "a kill broke a checkpoint"
    resumed = _metrics_by_step(workdir)
    assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    for step in range(1, TOTAL_STEPS + 1):
        assert resumed[step]["data/batch_crc32"] == expected[step]["data/batch_crc32"], f"step {step}: another batch"
        assert resumed[step]["loss"] == expected[step]["loss"], f"step {step}: loss differs"
