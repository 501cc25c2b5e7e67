"""What the tests' session compilation cache (tests/conftest.py) saves: two `trainer.train` runs of the
same tiny config in one process, each in a fresh workdir, with a persistent cache in a fresh folder. The
second run builds a new jax.jit of the same step, so without the cache it would compile it again; with
it, it loads the executable. Prints each run's seconds and losses (they must be bitwise the same).

    python bench/compile_cache.py [--runs 2]

On 8 simulated CPU devices, like the tests. Times on a shared machine are inflated: read the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    common.simulate_cpu_devices(8)
    import jax

    cache_dir = tempfile.mkdtemp(prefix="bench_compile_cache_")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # as tests/conftest.py sets
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    from siglip_jax.training import trainer
    from tests.helpers import tiny_config

    def config():  # tests/test_checkpoint_fallback.py's run
        return tiny_config(total_steps=8, checkpoint_every_steps=2, keep_checkpoints=10, tensorboard=False,
                           log_batch_checksums=True, **{"data.prefetch_batches": 1})

    losses = []
    for run in range(args.runs):
        workdir = os.path.join(tempfile.mkdtemp(prefix="bench_compile_cache_run_"), "run")
        start = time.perf_counter()
        trainer.train(config(), workdir)
        seconds = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as stream:
            losses.append([json.loads(line)["loss"] for line in stream])
        print(f"run {run} ({'cold' if run == 0 else 'from the cache'}): {seconds:.1f} s", flush=True)
    print("losses bitwise equal across runs:", all(run_losses == losses[0] for run_losses in losses))


if __name__ == "__main__":
    main()
