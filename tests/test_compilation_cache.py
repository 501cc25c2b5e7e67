"""JAX's persistent compilation cache in the command lines (runtime/compilation_cache.py, issue 31): where
it goes, that it can be turned off, and that a run from a warm cache computes bitwise what a cold one did."""
import json
import os
import subprocess
import sys

from siglip_jax.runtime import compilation_cache
from tests.helpers import child_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")


def test_the_flag_then_the_variables_then_the_workdir_or_the_user_folder_choose_the_folder():
    choose = compilation_cache.choose_location
    everything = {"SIGLIP_COMPILATION_CACHE": "/ours", "JAX_COMPILATION_CACHE_DIR": "/jax"}
    assert choose("/flag", "gs://b/run", everything) == "/flag"
    assert choose(None, "gs://b/run", everything) == "/ours"
    assert choose(None, "gs://b/run", {"JAX_COMPILATION_CACHE_DIR": "/jax"}) == "/jax"
    assert choose(None, "gs://b/run/", {}) == "gs://b/run/compilation_cache"  # a preempted VM loses its disk
    assert choose(None, "/tmp/run", {}) == compilation_cache.user_cache_folder()
    assert choose(None, None, {}) == compilation_cache.user_cache_folder()  # eval.py / export.py of a file
    assert choose("off", "/tmp/run", everything) is None and choose(None, None, {"SIGLIP_COMPILATION_CACHE": "OFF"}) is None


def _run(workdir, cache):
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={RECIPE}", f"--workdir={workdir}",
               "--config.total_steps=3", "--config.checkpoint_every_steps=0", f"--compilation_cache={cache}"]
    # Without JAX's variable (the session sets it), so the command's own default decides: every program is
    # cached however quick its compile (JAX's default keeps only those over 1 s, not the eval's).
    environment = child_environment(1)
    environment.pop(compilation_cache.MIN_COMPILE_ENV, None)
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        return [(line["loss"], line["data/batch_crc32"]) for line in map(json.loads, stream)]


def test_a_run_from_a_warm_cache_loads_every_program_and_computes_bitwise_the_same(tmp_path):
    cache = tmp_path / "cache"
    cold = _run(str(tmp_path / "cold"), str(cache))
    entries = sorted(os.listdir(cache))
    assert len(entries) >= 6, entries  # the initialiser, the step, and the eval's programs (each under 1 s)
    warm = _run(str(tmp_path / "warm"), str(cache))
    assert sorted(os.listdir(cache)) == entries  # nothing compiled again: every program came from the cache
    assert warm == cold and len(cold) == 3
