"""Start-up time with JAX's persistent compilation cache (on by default in train.py, eval.py, export.py):
`train.py` launched twice per recipe with a fresh cache folder, each time in a fresh workdir; the first run
compiles (cold), the second loads the compiled programs (warm). Prints, per run, the seconds from launch to
the first training step's log line and for the whole command (2 steps and the final eval), and the warm /
cold ratios. The losses of both runs must be bitwise equal.

    python bench/compile_cache.py [--recipes demo,s16,s16_stacked] [--steps 2]

demo: configs/demo.py. s16: the same recipe with issue 31's shapes, an S/16 image tower at 128 px and an S
text tower (12 blocks each), batch 32. s16_stacked: s16 with model.scan_layers and model.scan_unroll=12 (the
blocks stacked, the scan unrolled). One process at a time: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

S16 = {"model.image.variant": "S/16", "model.image.image_size": 128, "data.train.args.image_size": 128,
       "evals.demo.source.args.image_size": 128, "data.batch_size": 32, "data.eval_batch_size": 64,
       "model.text.variant": "S"}
for tower in ("image", "text"):
    S16.update({f"model.{tower}.width": 384, f"model.{tower}.depth": 12, f"model.{tower}.mlp_dim": 1536,
                f"model.{tower}.num_heads": 6})
# The same S/16 with its blocks stacked and unrolled: the same computation, a tenth of the parameter arrays.
RECIPES = {"demo": {}, "s16": S16, "s16_stacked": {**S16, "model.scan_layers": True, "model.scan_unroll": 12}}


def launch(overrides: dict, steps: int, cache: str) -> tuple[float, float, list]:
    """(seconds to the first step's log line, seconds for the whole command, losses) of one train.py run."""
    workdir = tempfile.mkdtemp(prefix="bench_startup_run_")
    command = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}",
               f"--config.total_steps={steps}", "--config.log_every_steps=1", f"--compilation_cache={cache}",
               *(f"--config.{key}={value}" for key, value in overrides.items())]
    env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
    start = time.perf_counter()
    first_step = None
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        output = []
        for line in process.stdout:
            output.append(line)
            if first_step is None and line.lstrip().startswith("step") and "loss" in line:
                first_step = time.perf_counter() - start
    whole = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit("".join(output[-30:]))
    with open(os.path.join(workdir, "metrics.jsonl")) as stream:
        losses = [json.loads(line)["loss"] for line in stream]
    return first_step, whole, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="demo,s16,s16_stacked")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for name in args.recipes.split(","):
        cache = tempfile.mkdtemp(prefix="bench_startup_cache_")
        cold = launch(RECIPES[name], args.steps, cache)
        warm = launch(RECIPES[name], args.steps, cache)
        print(f"{name}: first step cold {cold[0]:.1f} s, warm {warm[0]:.1f} s ({warm[0] / cold[0]:.2f}x); whole command "
              f"cold {cold[1]:.1f} s, warm {warm[1]:.1f} s ({warm[1] / cold[1]:.2f}x); losses bitwise equal: "
              f"{cold[2] == warm[2]}; load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
