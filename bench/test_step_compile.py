"""What the tests' tiny train step costs to build and compile, by tower depth: the figure behind
tests/helpers.py's depth-1 default (docs/testing.md). Each depth runs in a fresh process with the
persistent compilation cache off, so every compile is a real one.

    python bench/test_step_compile.py [--depths 1 2] [--xla_flags "--xla_backend_optimization_level=0"]

On 8 simulated CPU devices and the (8, 1, 1) mesh, like most tests. Times on a shared machine are
inflated: read the ratio, measured side by side in one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import common


def measure(depth: int) -> None:
    """In this process: build + compile the tiny step at `depth`, then print one line."""
    common.simulate_cpu_devices(8)
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    from tests.helpers import tiny_config

    start = time.perf_counter()
    common.compiled_train_step(tiny_config(depth), mesh_shape=(8, 1, 1))
    print(f"depth {depth}: build + compile {time.perf_counter() - start:.1f} s "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip()!r})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for every measurement")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # the child's own depth
    args = parser.parse_args()
    if args.measure is not None:
        measure(args.measure)
        return
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip())
    for depth in args.depths:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", str(depth)], env=env, check=True,
                       timeout=900)


if __name__ == "__main__":
    main()
