"""Resume and preemption, end to end: `python train.py` in a subprocess, killed (SIGKILL) or asked to stop
(SIGTERM), then the same command again, compared step by step with an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from siglip_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")  # 40 steps, checkpoints every 10
TOTAL_STEPS = 40
RUN_TIMEOUT_S = 600  # the first run compiles cold: 240 s ran out on the shared 2-core machine at load ~20


def _start(workdir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={RECIPE}", f"--workdir={workdir}"]
    with open(workdir + ".log", "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(process, workdir, timeout=RUN_TIMEOUT_S):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"train.py did not finish within {timeout} s; see {workdir}.log")


def _run(workdir):
    returncode = _finish(_start(workdir), workdir)
    assert returncode == 0, f"train.py failed with {returncode}; see {workdir}.log"


def _wait_for(condition, process, workdir, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"train.py exited ({process.returncode}) before the test could interrupt it; see {workdir}.log")
        if time.monotonic() > deadline:
            process.kill()
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
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    os.makedirs(workdir)
    _run(workdir)
    metrics = _metrics_by_step(workdir)
    assert sorted(metrics) == list(range(1, TOTAL_STEPS + 1))
    return metrics


@pytest.mark.slow
def test_rerun_after_sigkill_continues_bitwise(uninterrupted, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    process = _start(workdir)
    # Orbax renames a step's directory into place only once all of it is written.
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "20")), process, workdir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_metrics_by_step(workdir))
    assert killed_at < TOTAL_STEPS, "the run finished before the kill; the test proves nothing"
    resumed_from = checkpoint.latest_step(workdir)
    assert resumed_from in (20, 30)

    _run(workdir)
    resumed = _metrics_by_step(workdir)
    for step in range(resumed_from + 1, TOTAL_STEPS + 1):
        assert resumed[step]["data/batch_crc32"] == uninterrupted[step]["data/batch_crc32"], f"step {step}: another batch"
        assert resumed[step]["loss"] == uninterrupted[step]["loss"], f"step {step}: loss differs"
        assert resumed[step]["ema/param_norm"] == uninterrupted[step]["ema/param_norm"], f"step {step}: EMA differs"
    for step in range(1, killed_at + 1):  # the lines of the killed run are kept, not overwritten
        assert step in resumed
    assert checkpoint.latest_step(workdir) == TOTAL_STEPS


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
