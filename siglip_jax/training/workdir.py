"""The training workdir: created (or checked) before a run writes anything, and locked so that two runs
never interleave checkpoints or metrics in it.

The lock is `<workdir>/train.lock`, JSON with the holder's host, pid and start time. It is released when
the process exits (atexit). A lock left by a killed run (same host, that pid no longer alive) is taken
over with a warning; one held by a live process, or by another host, is refused with the holder named.
Only process 0 of a multi-process run takes it. Paths go through etils.epath, so gs:// workdirs work
(there a lock is written, not created atomically: enough to stop a second run started by mistake).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from typing import Any

import jax
from etils import epath

from siglip_jax.runtime import storage

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


def prepare(workdir: str) -> epath.Path:
    """Creates `workdir` (refusing a file there) and, on process 0, takes its lock until this process
    exits; returns the workdir's path. Raises FileExistsError when another live run holds the lock."""
    path = storage.path(workdir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"The workdir {workdir} is a file, not a directory: give a directory path as --workdir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        storage.check_writable(workdir)  # a bucket: fails here, with the fix, rather than late in the run
        if jax.process_index() == 0:
            _take_lock(path / LOCK_FILE)
    except PermissionError as error:
        raise PermissionError(
            f"Cannot write to the workdir {workdir} ({error.strerror or error}): choose a writable --workdir or fix its permissions."
        ) from error
    return path


def _this_process() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _take_lock(lock: epath.Path) -> None:
    me = _this_process()
    if lock.exists():
        try:
            holder = json.loads(lock.read_text())
        except (ValueError, OSError):
            holder = {}
        same_host = holder.get("host") == me["host"]
        if same_host and holder.get("pid") == me["pid"]:
            pass  # an earlier train() in this same process: ours
        elif same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
            logger.warning("Taking over the lock %s of a run that is gone (pid %s, started %s).", lock, holder["pid"], holder.get("started"))
        elif holder:
            raise FileExistsError(
                f"The workdir {lock.parent} is in use by another training run: pid {holder.get('pid')} on host "
                f"{holder.get('host')}, started {holder.get('started')} (lock file {lock}). Wait for it to finish, "
                f"stop it, or use another --workdir; if that run is gone (e.g. on another host), delete {lock}."
            )
        lock.unlink()
    _create(lock, json.dumps(me))
    atexit.register(_release, lock, me["pid"])


def _create(lock: epath.Path, text: str) -> None:
    """Writes the lock, failing if another process created it first (atomically on local disks)."""
    if "://" in str(lock):
        lock.write_text(text)
        return
    try:
        descriptor = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError as error:
        raise FileExistsError(f"Another training run took the lock {lock} at the same moment; use another --workdir.") from error
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


def _release(lock: epath.Path, pid: int) -> None:
    try:
        if lock.exists() and json.loads(lock.read_text()).get("pid") == pid:
            lock.unlink()
    except (OSError, ValueError):  # exiting anyway: a lock left behind is taken over by the next run
        pass
