"""The benches that build their towers from tests.helpers.tiny_config still run as written: bench/naflex_compile.py
stopped running when tiny_config's one block moved to mean pooling, which the NaFlex tower refuses, and nothing
noticed. Exit 0 and the result line only; times are not asserted (figures come from the benches on a quiet
machine, never from tests)."""
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
