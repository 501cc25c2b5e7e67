"""Checkpoints of training runs with Orbax: save (asynchronously), restore onto any mesh, and the
data stream's position, so a rerun of the same command continues exactly where the last one stopped.

A workdir holds `checkpoints/<step>/` with three items:
  state/   the TrainState (step, params, opt_state), as sharded arrays
  data/    each process's grain iterator state, `process_<i>-of-<n>.json` (written by grain's handler)
  config/  the config the run used, as JSON
Reading only the parameters (evaluation, export, init_from) is checkpoint_params.py.

Orbax writes a step into a temporary directory and renames it when every item is complete, so a save
killed midway leaves the previous checkpoint as the latest. A checkpoint that cannot be read anyway
(a disk error, a deleted file) is skipped with a warning naming it and the one used instead, and moved
aside to `checkpoints/broken/<step>.<time>` (kept for inspection, never deleted) so that the resumed
run can save that step again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from typing import Any, Iterable

import grain
import grain.checkpoint
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from siglip_jax import config as config_lib
from siglip_jax.data import pipeline
from siglip_jax.runtime import storage

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
BROKEN_SUBDIR = "broken"  # under checkpoints/: unreadable steps set aside (not a step number, so Orbax ignores it)
STATE, DATA, CONFIG = "state", "data", "config"
# A checkpoint made with a different value under these keys holds a different model: it is refused.
MODEL_KEYS = ("model",)
_DATA_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # grain's CheckpointHandler naming


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint was made with a different model than the config asks for."""


class NoCheckpointError(FileNotFoundError):
    """No complete, readable checkpoint where one was expected."""


def config_as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as saved and as compared."""
    return json.loads(json.dumps(config.to_dict()))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any], under: Iterable[str] | None = None) -> list[str]:
    """Keys whose values differ between two JSON configs (only those in the groups `under`, if given),
    each as "key: <saved> in the checkpoint, <current> now"."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    missing = object()

    def show(value: Any) -> str:
        return "absent" if value is missing else repr(value)

    lines = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        if under is not None and not any(key == group or key.startswith(group + ".") for group in under):
            continue
        old, new = saved_flat.get(key, missing), current_flat.get(key, missing)
        if old is missing or new is missing or old != new:
            lines.append(f"{key}: {show(old)} in the checkpoint, {show(new)} now")
    return lines


def checkpoint_root(workdir: str) -> str:
    return str(as_path(workdir) / CHECKPOINTS_SUBDIR)


def as_path(path: str) -> epath.Path:
    """A local path made absolute, or a cloud one (gs://...) as it is: Orbax and epath read both."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


def _preservation_policy(keep_checkpoints: int, keep_every_steps: int) -> Any:
    policies = ocp.checkpoint_managers
    keep = [policies.LatestN(keep_checkpoints)]
    if keep_every_steps > 0:
        keep.append(policies.EveryNSteps(keep_every_steps))
    return policies.AnyPreservationPolicy(keep)


# Orbax writes an array replicated over several devices as one slice per replica, in parallel
# ("replica-parallel"). For small arrays the per-slice device work costs more than the parallel writes
# save: on 8 CPU devices, 4 saves of the test model's state (~190 arrays, none over 100 KB) took 3.2 s with
# every array sliced and 1.1 s with this threshold (2026-12-06, docs/testing.md). Below this size per slice an
# array is written whole by one replica; the large ones of real models (embeddings, MLP kernels) stay parallel.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _write_small_arrays_whole() -> None:
    """Orbax's jax.Array handler with REPLICA_PARALLEL_MIN_SLICE_BYTES. Orbax takes array handlers from its
    process-wide registry only (StandardCheckpointHandler has no per-manager one), so this replaces the
    registered one; whether replica-parallel is used at all stays Orbax's platform default. Orbax logs a
    warning for every override; it says nothing a user can act on, so it is held back."""
    registered = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(registered, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_SLICE_BYTES:
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES),
            override=True)
    finally:
        absl_logger.setLevel(level)


class _BackgroundSaveTraceback(logging.Filter):
    """Orbax logs a failed background save with its whole traceback; the error the Checkpointer raises says
    what failed in one line (the traceback stays with it, shown by -v), so the log keeps the first line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname and "save" in str(record.msg).lower():
            record.exc_info, record.exc_text = None, None
        return True


def _log_background_save_failures_in_one_line() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(existing, _BackgroundSaveTraceback) for existing in absl_logger.filters):
        absl_logger.addFilter(_BackgroundSaveTraceback())


# How long one save may take to reach storage before it is an error (Orbax's own default): a bucket or
# endpoint that stops answering ends the run with a line naming it, instead of waiting forever.
SAVE_TIMEOUT_S = 1200


def open_manager(root: str, *, keep_checkpoints: int | None = None, keep_every_steps: int = 0, read_only: bool = False,
                 save_timeout_s: float = SAVE_TIMEOUT_S):
    if not read_only:
        _write_small_arrays_whole()
        _log_background_save_failures_in_one_line()
    options = ocp.CheckpointManagerOptions(
        async_options=ocp.AsyncOptions(timeout_secs=max(1, int(save_timeout_s))),
        preservation_policy=None if keep_checkpoints is None else _preservation_policy(keep_checkpoints, keep_every_steps),
        read_only=read_only,
        create=not read_only,
        # Leftovers of a save that was killed midway: never a checkpoint, so safe to delete.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(root, options=options, item_handlers=storage.checkpoint_item_handlers(root, arrays=STATE, grain_state=DATA, json_items=(CONFIG,)))


def latest_step(workdir: str) -> int | None:
    """The step of the latest complete checkpoint in `workdir`, or None when there is none."""
    root = checkpoint_root(workdir)
    if not storage.list_folder(epath.Path(root)):  # fresh: in a bucket another process may have saved since
        return None
    with open_manager(root, read_only=True) as manager:
        return manager.latest_step()


def read_config_json(step_dir: epath.Path) -> dict[str, Any]:
    """The config saved with the checkpoint in `step_dir`, as JSON data: the one reader of a saved config
    (resuming compares it, checkpoint_params.read_saved_config turns it into a ConfigDict)."""
    return ocp.JsonCheckpointHandler().restore(step_dir / CONFIG)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`tree` as ShapeDtypeStructs, carrying the target `shardings` where given: what Orbax restores into (and
    reshards to), what jax.export traces with."""
    if shardings is None:
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)
    return jax.tree.map(lambda leaf, target: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target), tree, shardings)


class Checkpointer:
    """Saves and restores a run's checkpoints under `<workdir>/checkpoints`, keeping the latest
    `keep_checkpoints` and, for good, every one at a multiple of `keep_every_steps` (0: none).

    Saves are asynchronous: `save` returns once the arrays are copied off the devices, and the files are
    written in the background; `close()` waits for them. Use as a context manager or call `close()`.
    """

    def __init__(self, workdir: str, *, keep_checkpoints: int = 3, keep_every_steps: int = 0,
                 save_timeout_s: float = SAVE_TIMEOUT_S):
        self.root = checkpoint_root(workdir)
        self.save_timeout_s = save_timeout_s
        self._manager = open_manager(self.root, keep_checkpoints=keep_checkpoints, keep_every_steps=keep_every_steps,
                                     save_timeout_s=save_timeout_s)
        # Orbax deletes unfinished saves in a background future it starts here and awaits only before its first
        # save; listing before it is done raced with it (a bucket step listed, then gone when moved aside).
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)  # private in orbax 0.12
        if await_cleanup is not None:
            await_cleanup()
        # A step directory Orbax does not list (emptied, or its commit marker lost) would block saving that step.
        listed = set(self._manager.all_steps())
        # (In a bucket, the root exists only once a save wrote into it, and Orbax has just deleted any step
        # without its commit marker: the save of a killed run.)
        on_disk = [int(p.name) for p in storage.list_folder(epath.Path(self.root)) if p.name.isdigit()]
        self._set_aside([step for step in on_disk if step not in listed], "it is not a complete checkpoint")
        self.last_saved_step: int | None = self._manager.latest_step()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, config: ml_collections.ConfigDict) -> bool:
        """Starts saving `state` (its arrays, on every process), this process's data position and the
        config as step `step`; returns False (and saves nothing) when that step is already saved."""
        if step == self.last_saved_step:
            return False
        with self._save_errors_named():  # a previous save still in flight is awaited here
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardSave(state),
                        DATA: grain.checkpoint.CheckpointSave(data_iterator),
                        CONFIG: ocp.args.JsonSave(config_as_json(config)),
                    }
                ),
                force=True,  # the trainer decides the cadence (every N steps, the end, preemption)
            )
        self.last_saved_step = step
        return True

    def wait_until_finished(self) -> None:
        with self._save_errors_named():
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _save_errors_named(self):
        """A save that timed out (storage that stopped answering) as one line naming where and what to check."""
        try:
            yield
        except TimeoutError as error:
            raise TimeoutError(
                f"Saving a checkpoint under {self.root} did not finish within {self.save_timeout_s:g} s"
                f"{storage.endpoint_description(self.root)}; the checkpoints saved before it are intact. Check "
                "that the storage answers (bucket, endpoint, credentials, free space), then rerun the same command."
            ) from error

    def close(self) -> None:
        """Waits for a save in flight to complete, then releases the manager."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def _set_aside(self, steps: list[int], reason: str) -> None:
        """Renames each step's directory to broken/<step>.<time> (process 0 only; all then see the result)."""
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            for step in sorted(steps):
                target = epath.Path(self.root) / BROKEN_SUBDIR / f"{step}.{stamp}"
                storage.move_tree(epath.Path(self.root) / str(step), target)
                logger.warning("Moved the checkpoint of step %d aside to %s (%s), so that step can be saved again.", step, target, reason)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("siglip_jax_set_aside_broken_checkpoints")
        self._manager.reload()

    def read_config(self, step: int) -> dict[str, Any]:
        return read_config_json(epath.Path(self.root) / str(step))

    def restore(
        self,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator,
        config: ml_collections.ConfigDict,
    ) -> tuple[Any, int]:
        """Restores the latest readable checkpoint into `abstract_state`'s shardings (any mesh) and moves
        `data_iterator` to its position; returns (state, step).

        Refuses (CheckpointMismatchError, listing the keys) a checkpoint of a different model. An
        unreadable checkpoint is skipped for the previous one, with a warning naming both; with none
        readable, raises NoCheckpointError listing why each failed.
        """
        current = config_as_json(config)
        failures, failed_steps, optimizer_changes = [], [], set()
        for step in sorted(self._manager.all_steps(), reverse=True):
            failed_steps.append(step)  # until it restores
            try:
                saved = config_lib.with_defaults(self.read_config(step))
            except Exception as error:  # noqa: BLE001 -- any read failure means: try the previous one
                failures.append(describe_read_failure(step, error, self.root))
                continue
            _check_same_model(saved, current, f"{self.root}/{step}")
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
                data_state = _data_state_for_this_process(epath.Path(self.root) / str(step) / DATA)
                data_iterator.set_state(data_state)
            except Exception as error:  # noqa: BLE001
                failures.append(describe_read_failure(step, error, self.root))
                optimizer_changes.update(_optimizer_structure_changes(saved, current))
                continue
            if failures:
                logger.warning(
                    "Could not read the newer checkpoint(s) (%s); resuming from the previous complete one, step %d.",
                    "; ".join(failures), step,
                )
                self._set_aside(failed_steps[:-1], "unreadable")
            _warn_if_batch_size_changed(saved, current, step)
            other_changes = config_differences(saved, current)
            if other_changes:
                logger.info("Resuming step %d with changed config keys: %s", step, "; ".join(other_changes))
            self.last_saved_step = step
            return restored[STATE], step
        if optimizer_changes:  # the saved state has another structure: every step fails alike, none is damaged
            fix = (f"The config changed the optimizer's structure ({', '.join(sorted(optimizer_changes))}), so the saved "
                   "optimizer state does not fit: resume with the checkpoint's optim settings, or start a new workdir "
                   f"with --config.init_from={self.root} to keep its parameters.")
        else:
            fix = (f"Delete those step directories under {self.root} (or move them elsewhere) to start this workdir "
                   "again, or start a new workdir.")
        raise NoCheckpointError(f"No checkpoint in {self.root} can be read: {'; '.join(failures) or 'there are none'}. {fix}")


# The optimizer settings that change the optimizer state's tree: a change makes every saved step unreadable.
_OPTIMIZER_STRUCTURE_KEYS = ("name", "grad_clip_norm", "weight_decay", "ema_decay", "frozen", "freeze")


def _optimizer_structure_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    before, now = saved.get("optim", {}), current.get("optim", {})
    changed = []
    for key in _OPTIMIZER_STRUCTURE_KEYS:
        old, new = before.get(key), now.get(key)
        if key in ("grad_clip_norm", "weight_decay", "ema_decay"):  # only switching on or off changes the tree
            old, new = bool(old), bool(new)
        if key in before and old != new:
            changed.append(f"optim.{key}: {before.get(key)!r} -> {now.get(key)!r}")
    return changed


def describe_read_failure(step: int, error: BaseException, root: str | os.PathLike | None = None) -> str:
    """`step N (the file named in the error, if any): Type: the first line of the message`, for a checkpoint
    step that could not be read: Orbax and TensorStore errors run to many lines of specs."""
    message = str(error).strip()
    where = ""
    if root is not None:
        # The longest path under this step's directory that the error names (TensorStore quotes its specs' paths).
        step_dir = os.fspath(root).rstrip("/") + f"/{step}/"
        paths = re.findall(re.escape(step_dir) + r"[^\s\"',}]*", message)
        where = f" ({max(paths, key=len)})" if paths else ""
    return f"step {step}{where}: {type(error).__name__}: {(message.splitlines() or [''])[0][:200]}"


def _warn_if_batch_size_changed(saved: dict[str, Any], current: dict[str, Any], step: int) -> None:
    """A resume with another global batch is allowed (e.g. after losing devices), but it is not the same run."""
    before, now = saved.get("data", {}).get("batch_size"), current["data"]["batch_size"]
    if before is not None and before != now:
        logger.warning(
            "Resuming step %d with data.batch_size=%d, but the checkpoint trained with %d: the data position is "
            "counted in batches, so the stream goes on at example %d instead of %d (examples are %s), and each "
            "remaining step of the schedule (total_steps, warm-up, decay) now sees %d examples instead of %d. "
            "Pass --config.data.batch_size=%d to continue the same run.",
            step, now, before, step * now, step * before, "skipped" if now > before else "seen again", now, before,
            before)


def _check_same_model(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    differences = config_differences(saved, current, under=MODEL_KEYS)
    if differences:
        raise CheckpointMismatchError(
            f"The checkpoint {where} was made with a different model config:\n  " + "\n  ".join(differences)
            + _optional_part_fixes(saved, current, where)
            + "\nResume with the checkpoint's model settings, or to start from its weights with another config, "
            "use a new workdir and set init_from to this workdir."
        )


@dataclasses.dataclass(frozen=True)
class _OptionalPart:
    """A part of SigLIP 2's recipe that a config can add to or drop from a checkpoint's model."""

    key: str  # model.<key>
    what: str  # its name in a sentence
    lacks: str  # what a checkpoint without it lacks
    init_skip: tuple[str, ...]  # init_skip patterns that start it fresh
    starts_as: str  # what starting fresh means
    holds: str  # what a checkpoint with it holds

    def present(self, config: dict[str, Any]) -> bool:
        part = config["model"].get(self.key, {})
        return bool(part.get("weight") or part.get("masked_weight"))


_OPTIONAL_PARTS = (
    _OptionalPart("decoder", "the caption decoder", "has none of its dec/... arrays", ("dec/.*",),
                  "the decoder starts fresh", "its dec/... arrays"),
    _OptionalPart("distill", "self-distillation (model.distill)", "has no distill/... head, mask token, teacher or centres",
                  ("distill/.*", "img/mask_token"), "the head and mask token start fresh, the teacher from the loaded "
                  "image tower", "its distill/... head, mask token and teacher"),
)


def _optional_part_fixes(saved: dict[str, Any], current: dict[str, Any], where: str) -> str:
    """What to do when a recipe adds or drops SigLIP 2's caption decoder or self-distillation over a checkpoint:
    one command for all the parts added, one for all dropped."""
    workdir = where.rsplit(f"/{CHECKPOINTS_SUBDIR}/", 1)[0]
    added = [part for part in _OPTIONAL_PARTS if part.present(current) and not part.present(saved)]
    dropped = [part for part in _OPTIONAL_PARTS if part.present(saved) and not part.present(current)]
    fixes = ""
    if added:
        patterns = [pattern for part in added for pattern in part.init_skip]
        skip = "(" + ", ".join(f'"{pattern}"' for pattern in patterns) + ("," if len(patterns) == 1 else "") + ")"
        fixes += (f"\nThe config adds {' and '.join(part.what for part in added)}: the checkpoint "
                  f"{'; it '.join(part.lacks for part in added)}. To train "
                  f"{'them' if len(added) > 1 else 'it'} beside the checkpoint's towers, start a new workdir with "
                  f"--config.init_from={workdir} and --config.init_skip='{skip}' "
                  f"({'; '.join(part.starts_as for part in added)}; the rest is loaded).")
    if dropped:
        fixes += (f"\nThe config drops {' and '.join(part.what for part in dropped)} that the checkpoint trained "
                  f"({'; '.join(part.holds for part in dropped)}). Keep "
                  f"{' and '.join('model.' + part.key for part in dropped)} as saved to resume, or start a new workdir "
                  f"with --config.init_from={workdir} --config.init_towers='(\"img\", \"txt\", \"t\", \"b\")' to "
                  f"continue without {'them' if len(dropped) > 1 else 'it'}.")
    return fixes


# ---- The data stream's position ------------------------------------------------------------------


def _read_data_states(data_dir: epath.Path) -> tuple[int, dict[int, Any]]:
    """(the process count that saved them, {process index: iterator state}) from a checkpoint's data item."""
    states: dict[int, Any] = {}
    counts = set()
    found = sorted(path.name for path in data_dir.iterdir()) if data_dir.is_dir() else []
    for name in found:
        match = _DATA_STATE_FILE.fullmatch(name)
        if match:
            index, count = int(match.group(1)), int(match.group(2))
            counts.add(count)
            states[index] = json.loads((data_dir / name).read_text())
    if len(counts) != 1 or len(states) != next(iter(counts)):
        raise NoCheckpointError(
            f"The data iterator states in {data_dir} are missing or incomplete (found {found or 'no directory'}); "
            "expected one process_<i>-of-<n>.json per process."
        )
    return counts.pop(), states


def _data_state_for_this_process(data_dir: epath.Path) -> Any:
    saved_count, states = _read_data_states(data_dir)
    if saved_count == jax.process_count():
        return states[jax.process_index()]
    return pipeline.redistribute_positions(states, jax.process_count())[jax.process_index()]


__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "NoCheckpointError",
    "abstract_like",
    "config_differences",
    "describe_read_failure",
    "latest_step",
    "read_config_json",
]
