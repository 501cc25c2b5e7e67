"""Preemption notices: SIGTERM (what TPU VMs, GCE and SLURM send before killing a job) asks the loop to
finish its step, save and exit cleanly, and on several hosts every process stops at the same step."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


class PreemptionWatch:
    """`should_stop(step)` turns True, at the same step on every process, after a SIGTERM.

    One process: a SIGTERM handler sets a flag that the loop reads after each step. Several processes:
    JAX's preemption sync service (started by `jax.distributed.initialize`) hears the SIGTERM on any
    host and picks a step all hosts reach; asking it costs no collective per step, unlike all-reducing
    a flag, which would block the host on the device every step.
    """

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._previous_handler: Any = None
        self._use_sync_service = jax.process_count() > 1
        # Python signal handlers can only be set from the main thread (a loop run from a worker thread
        # just does not react to SIGTERM).
        if not self._use_sync_service and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        del signum, frame
        logger.warning("SIGTERM received: finishing this step, saving a checkpoint and exiting.")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """Call after every step, on every process, with the same step numbers."""
        if self._use_sync_service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        """Puts back the SIGTERM handler that was there before."""
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
