"""Test session setup: 8 simulated CPU devices, set before JAX initialises its backends, and one persistent
compilation cache for the session, shared with every subprocess the tests start."""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and run a few steps each, so compiling dominates: at XLA's backend
# (LLVM) optimisation level 0 the tiny train step compiles in ~6 s instead of ~10 s and runs in 8 ms
# instead of 3 ms, with the same loss to the last bit (2026-12-06). Level 0 changes code generation only,
# not the HLO program nor its float semantics. Inherited by every subprocess the tests start.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# Many tests build the same tiny train step (trainer.train in process, train.py in subprocesses); each
# build is a new jax.jit, so only a persistent cache lets the second build load the executable instead of
# compiling it again (tens of seconds each on two loaded cores). Set in the environment before JAX is
# imported, so this process and every child (they all inherit os.environ) read and fill the same cache.
# A cache dir given from outside (e.g. kept between CI runs) is used as it is and not removed.
_OWN_CACHE_DIR = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="siglip_jax_test_compile_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # a train run also compiles ~100 small ops
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# pytest-xdist (`-n 2 --dist loadscope`, .ci/run) hands whole modules to the workers in collection order;
# the longest go first so the other worker is not left idle at the end (longest-first packing). Order
# only: every module still runs. Module times are in docs/testing.md.
LONGEST_MODULES_FIRST = (
    # test_resume.py's train.py runs compile tests/resume_recipe.py's step, which test_trainer.py loads.
    "test_resume.py", "test_train_step.py", "test_remote_storage.py", "test_multihost.py", "test_divergence.py",
    "test_finetune_e2e.py", "test_losses.py", "test_accumulation.py", "test_models.py", "test_streaming_resume.py",
    "test_checkpoint_fallback.py", "test_naflex_e2e.py", "test_ema.py", "test_coco_recipe.py", "test_checkpoint.py",
    "test_streaming.py", "test_trainer.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order otherwise
