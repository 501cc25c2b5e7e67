"""JAX's persistent compilation cache for the command lines (train.py, eval.py, export.py), on by default: a
rerun, or a resume after preemption, loads the compiled programs instead of compiling them again.

Where: --compilation_cache=FOLDER, else $SIGLIP_COMPILATION_CACHE, else JAX's own JAX_COMPILATION_CACHE_DIR,
else `<workdir>/compilation_cache` for a bucket workdir (a preempted VM comes back without its disk) and
~/.cache/siglip_jax/jax_compilation_cache otherwise. "off" in either setting turns it off. JAX keys each
entry by the program, the devices, the compile options and the JAX/XLA versions, so a cached program is
the one a fresh compile would make: results do not change (tests/test_compilation_cache.py).
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

from siglip_jax.runtime import storage

logger = logging.getLogger(__name__)

OFF = "off"
# JAX caches only programs that took a second to compile; an eval's dozen smaller programs (0.05-0.5 s each) then
# compile again on every rerun. Measured on the demo (bench/compile_cache.py, docs/speed.md).
MIN_COMPILE_SECONDS = 0.0
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
ENV = "SIGLIP_COMPILATION_CACHE"
WORKDIR_SUBDIR = "compilation_cache"
FLAG_HELP = ("Folder (or gs:// path) for JAX's persistent compilation cache, or 'off' (default: $SIGLIP_COMPILATION_CACHE, "
             "$JAX_COMPILATION_CACHE_DIR, <workdir>/compilation_cache for a bucket workdir, else "
             "~/.cache/siglip_jax/jax_compilation_cache).")


def user_cache_folder() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "siglip_jax", "jax_compilation_cache")


def choose_location(flag_value: str | None, workdir: str | None = None,
                    environ: Mapping[str, str] = os.environ) -> str | None:
    """The cache folder the settings above choose, or None when it is turned off."""
    value = flag_value or environ.get(ENV) or environ.get("JAX_COMPILATION_CACHE_DIR")
    if not value:
        value = f"{workdir.rstrip('/')}/{WORKDIR_SUBDIR}" if workdir and storage.is_remote(workdir) else user_cache_folder()
    return None if value.strip().lower() == OFF else value


def enable(flag_value: str | None, workdir: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at the chosen folder (before anything is compiled), or turns it
    off; returns the folder, None when off."""
    location = choose_location(flag_value, workdir)
    if location is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not storage.is_remote(location):
        location = os.path.abspath(os.path.expanduser(location))
        os.makedirs(location, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", location)
    if MIN_COMPILE_ENV not in os.environ:  # JAX's own variable, when set, still decides
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    logger.info("Compiled programs are cached in %s (--compilation_cache=off turns this off).", location)
    return location
