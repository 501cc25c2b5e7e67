"""The workdir lock with real OS processes: a second run on a locked workdir is refused at start naming
the holder; a lock left by a SIGKILLed process is taken over with a log line; the lock goes at exit."""
import json
import os
import signal
import subprocess
import sys

import pytest

from siglip_jax.training import workdir as workdir_lib
from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")
TIMEOUT_S = 240
HOLD = "import sys, time; from siglip_jax.training import workdir; workdir.prepare(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


def _env():
    return child_environment(PYTHONPATH=REPO)


def _train(workdir, *overrides):
    command = [sys.executable, "train.py", f"--config={RECIPE}", f"--workdir={workdir}", *overrides]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture
def holder(tmp_path):
    """A live process (its own process group) holding the lock of a fresh workdir."""
    workdir = str(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-c", HOLD, workdir], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield workdir, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.slow
def test_second_run_refused_then_a_killed_holder_is_taken_over(holder):
    workdir, process = holder
    lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
    held = json.loads(open(lock).read())
    assert held["pid"] == process.pid and held["host"] and held["started"]

    refused = _train(workdir)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert f"in use by another training run: pid {process.pid} on host {held['host']}" in refused.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints")), "the refused run wrote into the workdir"

    os.killpg(process.pid, signal.SIGKILL)  # the holder dies without releasing its lock
    process.wait(timeout=30)
    assert os.path.exists(lock)
    taken = _train(workdir, "--config.total_steps=2", "--config.checkpoint_every_steps=0")
    assert taken.returncode == 0, taken.stderr[-3000:]
    assert f"Taking over the lock {lock} of a run that is gone (pid {process.pid}" in taken.stderr
    assert not os.path.exists(lock), "the lock was not released at exit"


def test_lock_of_this_process_is_reentrant_and_a_file_is_refused(tmp_path):
    """trainer.train twice in one process (tests, notebooks) takes its own lock again."""
    workdir = str(tmp_path / "run")
    workdir_lib.prepare(workdir)
    workdir_lib.prepare(workdir)
    assert json.loads(open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read())["pid"] == os.getpid()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        workdir_lib.prepare(str(tmp_path / "file"))
