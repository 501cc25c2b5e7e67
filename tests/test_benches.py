"""Benches kept runnable by the suite: those built on tests.helpers.tiny_config (bench/naflex_compile.py stopped
running when tiny_config's one block moved to mean pooling, which the NaFlex tower refuses, and nothing noticed),
and the accelerator check of issue 31, whose dry run goes through the same Python path (bench/train_step.py's
step, MFU line and attention check) on the CPU at tiny shapes. Exit codes and result lines only; times are not
asserted (figures come from the benches on a quiet machine, never from tests)."""
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command, result_line", [
    (["bench/naflex_compile.py"], r"train step compile: vit [\d.]+ s, naflex [\d.]+ s, ratio [\d.]+"),
    (["bench/test_step_compile.py", "--depths", "1"], r"depth 1: build \+ compile [\d.]+ s"),
], ids=["naflex_compile", "test_step_compile"])
def test_bench_built_on_the_test_towers_runs(command, result_line):
    done = subprocess.run([sys.executable, *command], cwd=REPO, env=child_environment(None, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert re.search(result_line, done.stdout), done.stdout[-3000:]


def test_the_device_check_dry_run_passes_on_a_cpu():
    environment = child_environment(None, SIGLIP_DEVICE_DRY_RUN="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(REPO, "bench", "device_check.sh")], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # On a CPU, float32: XLA's attention is the expected kernel and the check says so.
    assert "attention check: ok (cuDNN expected: False)" in done.stdout, done.stdout[-3000:]
    assert "device check:" in done.stdout and "s in all" in done.stdout
