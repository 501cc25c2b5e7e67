"""Local paths and buckets (gs://, s3://) behind one interface: etils epath, which reaches buckets through
fsspec (gcsfs, s3fs; no TensorFlow). Also bounded retries for transient remote failures and a start-up
check that names a missing bucket or missing credentials.

Emulators and other endpoints: gcsfs honours STORAGE_EMULATOR_HOST and tensorstore (Orbax's arrays)
TENSORSTORE_GCS_HTTP_URL; s3fs and tensorstore honour AWS_ENDPOINT_URL. `point_tensorstore_at_emulator`
derives tensorstore's setting from STORAGE_EMULATOR_HOST, so the one variable users already set reaches both.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable, MutableMapping, TypeVar

from etils import epath

logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("gs://", "s3://")
RETRIES = 4  # attempts after the first, at 0.5, 1, 2, 4 s
WRITE_CHECK_TIMEOUT_S = 60.0  # the start-up write through tensorstore: a bucket that does not answer in this is an error
GCS_DEFAULT_ENDPOINT = "https://storage.googleapis.com"
GCS_REQUEST_TIMEOUT_S = 120.0  # one gcsfs request (a 50 MB chunk at 0.5 MB/s); gcsfs waits without end by default
# The variables that decide where bucket clients connect and as whom, named in errors about an unreachable bucket.
ENDPOINT_SETTINGS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_APPLICATION_CREDENTIALS",
                     "AWS_ENDPOINT_URL", "AWS_PROFILE")
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


def _bucket_filesystem(location: epath.Path):
    from etils.epath import backend

    return backend.fsspec_backend.fs(location)  # epath's own instance, so invalidating its listings reaches epath


def list_folder(folder: epath.Path) -> list[epath.Path]:
    """The entries of a folder as they are now ([] when it does not exist). In a bucket the listing
    cached by an earlier call (gcsfs keeps one per folder) is dropped first: Orbax may have deleted
    objects since, through paths whose parents' listings gcsfs does not update."""
    if is_remote(folder):
        _bucket_filesystem(folder).invalidate_cache()
    try:
        return list(folder.iterdir()) if folder.exists() else []
    except FileNotFoundError:  # emptied between the check and the listing (a bucket folder is its objects)
        return []


def move_tree(source: epath.Path, target: epath.Path) -> None:
    """Renames a folder; in a bucket (no folders, no rename) its objects are copied under `target` and
    deleted, so `target`'s parent need not exist there."""
    if not is_remote(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        return
    import fsspec

    filesystem = _bucket_filesystem(source)
    source_key, target_key = (fsspec.core.strip_protocol(os.fspath(p)).rstrip("/") for p in (source, target))
    filesystem.invalidate_cache()  # a listing cached before the folder was written would list nothing
    keys = with_retries(lambda: filesystem.find(source_key), f"Listing {source}")
    if not keys:
        raise FileNotFoundError(f"Nothing to move: {source} holds no objects.")
    for key in keys:
        destination = target_key + key[len(source_key):]
        with_retries(lambda: filesystem.copy(key, destination), f"Copying {key} to {destination}")
    with_retries(lambda: filesystem.rm(source_key, recursive=True), f"Deleting {source}")
    filesystem.invalidate_cache()  # gcsfs would otherwise go on listing the folders as they were before


def upload(local: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a local file, or a folder's files (keeping their relative paths), to `target` in a bucket;
    each object is written whole, with retries. For writers that take local paths only (exports)."""
    local, target = os.fspath(local), path(target)
    files = [local] if os.path.isfile(local) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names)
    for file in files:
        destination = target if file == local else target / os.path.relpath(file, local)
        with open(file, "rb") as stream:
            data = stream.read()
        with_retries(lambda: destination.write_bytes(data), f"Writing {destination}")


def point_tensorstore_at_emulator(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """With STORAGE_EMULATOR_HOST set (a GCS emulator, as gcsfs and Google's client libraries read it),
    sets what tensorstore, Orbax's array writer, reads instead: TENSORSTORE_GCS_HTTP_URL, and a fixed
    token (an emulator takes any; without one tensorstore searches for credentials and, finding none,
    retries for many minutes). Variables already set are kept. Returns the ones it set."""
    host = environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return {}
    derived = {"TENSORSTORE_GCS_HTTP_URL": host if "://" in host else f"http://{host}",
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    added = {name: value for name, value in derived.items() if name not in environ}
    environ.update(added)
    if added:
        logger.info("STORAGE_EMULATOR_HOST is set: tensorstore (checkpoint arrays) uses it too (%s).",
                    ", ".join(f"{name}={value}" for name, value in added.items()))
    return added


def configure_bucket_clients(environ: MutableMapping[str, str] = os.environ) -> None:
    """What the command lines set before touching a bucket: tensorstore follows a GCS emulator
    (point_tensorstore_at_emulator), and every gcsfs request is bounded by GCS_REQUEST_TIMEOUT_S, so a
    write or upload (metrics, exports, TensorBoard events) to a bucket that stops answering fails after
    with_retries' retries instead of waiting forever. Settings already in fsspec's config are kept."""
    import fsspec.config

    point_tensorstore_at_emulator(environ)
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("requests_timeout", GCS_REQUEST_TIMEOUT_S)


def endpoint_settings(environ: MutableMapping[str, str] = os.environ) -> str:
    """The bucket-client settings in effect, for error messages: "NAME=value" for each one set."""
    found = [f"{name}={environ[name]}" for name in ENDPOINT_SETTINGS if environ.get(name)]
    return ", ".join(found) or "none of " + ", ".join(ENDPOINT_SETTINGS)


def tensorstore_gcs_endpoint() -> str:
    """Where tensorstore (Orbax's array writer) sends gs:// requests."""
    return os.environ.get("TENSORSTORE_GCS_HTTP_URL", GCS_DEFAULT_ENDPOINT)


def endpoint_description(location: str | os.PathLike) -> str:
    """" (endpoint E; settings: ...)" for a gs:// location, where tensorstore writes the arrays; "" otherwise."""
    if not os.fspath(location).startswith("gs://"):
        return ""
    return f" (endpoint {tensorstore_gcs_endpoint()}; settings: {endpoint_settings()})"


def check_writable(location: str | os.PathLike, timeout_s: float = WRITE_CHECK_TIMEOUT_S) -> None:
    """Fails at start-up, with the fix, when a bucket workdir cannot be written (no such bucket, no
    credentials, an endpoint that does not answer), instead of late in the run or never: once through
    gcsfs/s3fs (metrics, logs) and, for gs://, once through tensorstore, the client Orbax writes the
    checkpoint's arrays with, bounded by `timeout_s`."""
    if not is_remote(location):
        return
    probe = path(location) / ".siglip_jax_write_check"
    try:
        with_retries(lambda: probe.write_text("ok"), f"Writing {probe}", retries=2)
        probe.unlink()
    except Exception as error:  # noqa: BLE001 -- every failure here has the same fix
        raise PermissionError(f"Cannot write to {location} ({type(error).__name__}: {error}). {bucket_hint(location)}") from error
    if os.fspath(location).startswith("gs://"):
        _check_tensorstore_writes(os.fspath(location), timeout_s)


def _check_tensorstore_writes(location: str, timeout_s: float) -> None:
    import tensorstore as ts

    key = ".siglip_jax_write_check"
    try:
        store = ts.KvStore.open(location.rstrip("/") + "/").result(timeout=timeout_s)
        store.write(key, b"ok").result(timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 -- a timeout and a refusal have the same fix
        what = f"no answer within {timeout_s:g} s" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        raise PermissionError(
            f"Checkpoints cannot be written to {location}: tensorstore (Orbax's array writer) got {what} from "
            f"{tensorstore_gcs_endpoint()}. Settings: {endpoint_settings()}. For an emulator set STORAGE_EMULATOR_HOST (or "
            f"TENSORSTORE_GCS_HTTP_URL); for GCS itself: {bucket_hint(location)}"
        ) from error
    # Deleted through gcsfs: a range delete through tensorstore lists the bucket, which the GCS emulator
    # answers with every object, and so removed more than the probe there.
    with_retries((path(location) / key).unlink, f"Deleting {path(location) / key}", retries=2)


def bucket_hint(location: str | os.PathLike) -> str:
    """The fix for a bucket path that cannot be reached: its bucket's name and the credential settings."""
    bucket = os.fspath(location).split("/")[2]
    return (f"Check that the bucket {bucket!r} exists and that credentials are set (gs://: gcloud auth "
            "application-default login or GOOGLE_APPLICATION_CREDENTIALS; s3://: AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE).")


def check_checkpoint_location(workdir: str | os.PathLike) -> None:
    """Refuses, at start-up, a workdir where checkpoints cannot be written: Orbax (0.12) takes local
    paths and gs:// but not s3:// (data shards and metrics do work from s3://). Points tensorstore at a GCS
    emulator given by STORAGE_EMULATOR_HOST and bounds bucket requests (configure_bucket_clients)."""
    configure_bucket_clients()
    if os.fspath(workdir).startswith("s3://"):
        raise ValueError(
            f"--workdir={os.fspath(workdir)}: checkpoints cannot be written to s3:// (Orbax does not support it). "
            "Use a gs:// or a local workdir (an S3 bucket mounted with s3fs-fuse or mountpoint-s3 is local); "
            "shards may still be read from s3://."
        )


def checkpoint_item_handlers(root: str, *, arrays: str, grain_state: str, json_items: tuple[str, ...]) -> dict | None:
    """Orbax handlers for a checkpoint root: None (Orbax's defaults, OCDBT) for a local one; in a bucket,
    arrays are written without OCDBT. OCDBT reads its manifest back with the object's generation, which
    GCS emulators (gcp-storage-emulator) leave out of media downloads, and a flat layout of one object
    per chunk is what plain object stores handle best anyway."""
    if not is_remote(root):
        return None
    import grain.checkpoint
    import orbax.checkpoint as ocp

    handlers = {arrays: ocp.StandardCheckpointHandler(use_ocdbt=False), grain_state: grain.checkpoint.CheckpointHandler()}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in json_items})
    return handlers


class LocalMirror:
    """A local folder for a library that writes only local files (tensorboardX), copied to a bucket
    location by `sync()`; for a local location it is that folder and `sync()` does nothing. Each sync
    uploads the files that changed since the last one, so a killed run loses at most what was written
    after its last sync."""

    def __init__(self, location: str | os.PathLike):
        self.remote = path(location) if is_remote(location) else None
        self.local = tempfile.mkdtemp(prefix="siglip_jax_mirror_") if self.remote else os.fspath(location)
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        if self.remote is None:
            return
        for name in sorted(os.listdir(self.local)):
            local = os.path.join(self.local, name)
            size = os.path.getsize(local)
            if os.path.isfile(local) and self._sizes.get(name) != size:
                data = open(local, "rb").read()
                with_retries(lambda: (self.remote / name).write_bytes(data), f"Writing {self.remote / name}")
                self._sizes[name] = size
