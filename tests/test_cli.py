"""Every CLI turns the project's own errors into one line on stderr and a non-zero exit (no traceback);
-v or SIGLIP_TRACEBACK=1 brings the traceback back; --config overrides naming no key are refused with the
nearest valid keys. Each case is a real subprocess; they run side by side to keep the test short."""
import os
import subprocess
import sys

import pytest

from siglip_jax.io import params as params_lib
from tests.helpers import child_environment, tiny_config
from tests.params_helpers import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "tests", "resume_recipe.py")
TIMEOUT_S = 240


def _run_all(commands, extra_env=None):
    """{name: (returncode, stderr)} of each command, all started at once."""
    env = {k: v for k, v in child_environment(PYTHONPATH=REPO).items() if k != "SIGLIP_TRACEBACK"}
    env.update(extra_env or {})
    processes = {name: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, args in commands.items()}
    results = {}
    for name, process in processes.items():
        try:
            _, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"{name}: did not finish within {TIMEOUT_S} s")
        results[name] = (process.returncode, stderr)
    return results


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = tiny_config()
    model = str(root / "model.msgpack")
    params_lib.save_params_file(model, config, random_params(config))
    (root / "no_images").mkdir()
    (root / "not_an_index.npz").write_text("plain text, not an index\n")
    (root / "a_file").write_text("a file where the workdir should be\n")
    (root / "broken_recipe.py").write_text("def get_config(:\n    pass\n")
    return root, model


def test_each_cli_says_what_is_wrong_in_one_line(paths):
    root, model = paths
    missing = str(root / "missing")
    train = ["train.py", f"--config={RECIPE}"]
    cases = {
        # name: (command, what stderr must name)
        "unknown key": ([*train, f"--workdir={root / 'w1'}", "--config.bogus=1"], "Unknown config key 'bogus'"),
        "mistyped nested key": ([*train, f"--workdir={root / 'w2'}", "--config.optim.learnin_rate=1"],
                                "Did you mean 'optim.learning_rate'"),
        "total_steps=0": ([*train, f"--workdir={root / 'w3'}", "--config.total_steps=0"], "'total_steps' must be positive"),
        "workdir is a file": ([*train, f"--workdir={root / 'a_file'}"], "is a file, not a directory"),
        "recipe with a syntax error": (["train.py", f"--config={root / 'broken_recipe.py'}", f"--workdir={root / 'w4'}"],
                                       "invalid syntax (broken_recipe.py, line 1)"),
        "recipe argument it would ignore": (["train.py", "--config=configs/demo.py:bogus", f"--workdir={root / 'w5'}"],
                                            "configs/demo.py takes no argument or 'naflex', got 'bogus'"),
        "negative learning rate": ([*train, f"--workdir={root / 'w6'}", "--config.optim.learning_rate=-1"],
                                   "optim.learning_rate must be a finite number >= 0, got -1"),
        "a run that diverges": ([*train, f"--workdir={root / 'w7'}", "--config.optim.learning_rate=1e30",
                                 "--config.max_nonfinite_steps=2"], "2 steps in a row had a NaN or Inf"),
        "eval of a missing workdir": (["eval.py", f"--workdir={missing}"], f"Cannot load a model from {str(missing)!r}"),
        "export of a missing workdir": (["export.py", f"--workdir={missing}", "--format=params", f"--output={root / 'o'}"],
                                        missing),
        "search of an empty folder": (["-m", "siglip_jax.inference.search", "index", str(root / "no_images"), f"--model={model}",
                                       f"--output={root / 'index.npz'}"], "No readable images"),
        "search with a non-index file": (["-m", "siglip_jax.inference.search", "query", str(root / "not_an_index.npz"), "dog"], ""),
        "convert of a missing folder": (["tools/convert.py", "--source=flickr8k", f"--path={missing}",
                                         f"--output_dir={root / 'shards'}"], missing),
        "tokenizer of a missing folder": (["tools/train_tokenizer.py", "--source=flickr8k", f"--path={missing}",
                                           f"--output={root / 'sp.model'}"], missing),
        "plot of a missing file": (["tools/plot.py", f"{missing}.jsonl"], f"{missing}.jsonl"),
    }
    if os.path.isdir("/sys/kernel"):
        # sysfs refuses new files even to root, so it stands for a read-only workdir everywhere
        cases["read-only workdir"] = ([*train, "--workdir=/sys/kernel"], "Cannot write to the workdir /sys/kernel")
    results = _run_all({name: command for name, (command, _) in cases.items()})
    for name, (returncode, stderr) in results.items():
        named = cases[name][1]
        assert returncode != 0, f"{name}: exit 0\n{stderr[-2000:]}"
        assert "Traceback" not in stderr, f"{name}: a traceback\n{stderr[-3000:]}"
        error_lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, f"{name}: expected one error line\n{stderr[-2000:]}"
        assert named in error_lines[0], f"{name}: {named!r} not in {error_lines[0]!r}"
    unknown = [line for line in results["unknown key"][1].splitlines() if line.startswith("error: ")][0]
    assert "Valid keys at this level: accum_steps," in unknown  # the valid keys, listed


def test_traceback_on_request(paths):
    root, _ = paths
    missing = str(root / "missing")
    results = _run_all({"-v": ["tools/plot.py", f"{missing}.jsonl", "-v"]})
    results.update(_run_all({"env": ["eval.py", f"--workdir={missing}"]}, extra_env={"SIGLIP_TRACEBACK": "1"}))
    for name, (returncode, stderr) in results.items():
        assert returncode != 0 and "Traceback" in stderr, f"{name}: no traceback\n{stderr[-2000:]}"
