"""Local paths and buckets (gs://, s3://) behind one interface: etils epath, which reaches buckets through
fsspec (gcsfs, s3fs; no TensorFlow). Also bounded retries for transient remote failures and a start-up
check that names a missing bucket or missing credentials.

Emulators and other endpoints: gcsfs honours STORAGE_EMULATOR_HOST and tensorstore (Orbax's arrays)
TENSORSTORE_GCS_HTTP_URL; s3fs and tensorstore honour AWS_ENDPOINT_URL.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, TypeVar

from etils import epath

logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("gs://", "s3://")
RETRIES = 4  # attempts after the first, at 0.5, 1, 2, 4 s
T = TypeVar("T")


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def path(location: str | os.PathLike) -> epath.Path:
    """A bucket path as it is, a local one made absolute (never a local folder named "gs:")."""
    location = os.fspath(location)
    return epath.Path(location if "://" in location else os.path.abspath(location))


def with_retries(action: Callable[[], T], what: str, retries: int = RETRIES, first_wait_s: float = 0.5) -> T:
    """`action()`, retried with doubling waits after an OSError or a connection error (a missing object,
    FileNotFoundError, is not retried); after `retries` retries the last error is raised, naming `what`."""
    for attempt in range(retries + 1):
        try:
            return action()
        except FileNotFoundError:
            raise
        except (OSError, ConnectionError, TimeoutError) as error:
            if attempt == retries:
                raise OSError(f"{what} failed {retries + 1} times, the last with {type(error).__name__}: {error}") from error
            wait = first_wait_s * 2**attempt
            logger.warning("%s failed (%s: %s); retrying in %.1f s (%d/%d).", what, type(error).__name__, error, wait, attempt + 1, retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def append_text(file: epath.Path, text: str) -> None:
    """Appends to a file; buckets have no append, so there the object is rewritten with the text added."""
    if not is_remote(file):
        with open(file, "a") as stream:
            stream.write(text)
        return
    before = file.read_text() if file.exists() else ""
    with_retries(lambda: file.write_text(before + text), f"Writing {file}")


def check_writable(location: str | os.PathLike) -> None:
    """Fails at start-up, with the fix, when a bucket workdir cannot be written (no such bucket, no
    credentials), instead of late in the run."""
    if not is_remote(location):
        return
    probe = path(location) / ".siglip_jax_write_check"
    try:
        with_retries(lambda: probe.write_text("ok"), f"Writing {probe}", retries=2)
        probe.unlink()
    except Exception as error:  # noqa: BLE001 -- every failure here has the same fix
        bucket = os.fspath(location).split("/")[2]
        raise PermissionError(
            f"Cannot write to {location} ({type(error).__name__}: {error}). Check that the bucket {bucket!r} exists "
            "and that credentials are set (gs://: gcloud auth application-default login or "
            "GOOGLE_APPLICATION_CREDENTIALS; s3://: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)."
        ) from error
