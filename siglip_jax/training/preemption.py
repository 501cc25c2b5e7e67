"""Preemption notices: SIGTERM (what TPU VMs, GCE and SLURM send before killing a job) asks the loop to
finish its step, save and exit cleanly, and on several hosts every process stops at the same step. In one
process Ctrl-C (SIGINT) does the same, so the steps since the last save are kept; a second Ctrl-C stops at
once."""
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
        self._previous_handlers: dict[int, Any] = {}
        self._use_sync_service = jax.process_count() > 1
        # Python signal handlers can only be set from the main thread (a loop run from a worker thread
        # just does not react to SIGTERM).
        if not self._use_sync_service and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._requested.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        logger.warning("%s received: stopping after the step in progress (saving a checkpoint) or, during start-up, "
                       "before the first step%s.",
                       signal.Signals(signum).name,
                       " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else "")
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """Call after every step, on every process, with the same step numbers."""
        if self._use_sync_service:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested.is_set()

    def close(self) -> None:
        """Puts back the SIGTERM and SIGINT handlers that were there before."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
