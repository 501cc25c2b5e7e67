"""bench/device_check.sh, the accelerator check of issue 31, kept runnable where no device is: its dry run goes
through the same Python path (bench/train_step.py's step, MFU line and attention check) on the CPU at tiny shapes."""
import os
import subprocess
import sys

from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_device_check_dry_run_passes_on_a_cpu():
    environment = child_environment(None, SIGLIP_DEVICE_DRY_RUN="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(REPO, "bench", "device_check.sh")], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # On a CPU, float32: XLA's attention is the expected kernel and the check says so.
    assert "attention check: ok (cuDNN expected: False)" in done.stdout, done.stdout[-3000:]
    assert "device check:" in done.stdout and "s in all" in done.stdout
