"""The loop's periodic actions as hooks (as levanter's trainer hooks): each says when it is due from its
cadence in the config and returns the metrics it adds to the step's log line.

The loop calls, for every hook in order: `before_step(step)` before dispatching a step, then, after it,
`run(info)` where `due(step, is_last)`; `finish()` when the loop ends (after the last step or a
preemption), and `close()` always, also after an error.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any, Callable

import jax
import numpy as np

from siglip_jax.training import metrics as metrics_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook may read after a step was dispatched. `metrics` are still on the device: reading
    them waits for the step to finish."""

    step: int
    state: Any  # the TrainState after the step
    metrics: Any  # the step's scalar metrics
    local_batch: dict[str, Any]  # this process's rows of the batch, as numpy
    is_last: bool
    num_skipped: int = 0  # unusable records this process skipped so far in this run (preprocess.first_usable_example)
    epochs: Any = None  # streamed sources: the epoch each example of the local batch is from
    skipped_by_shard: dict[str, int] = dataclasses.field(default_factory=dict)  # streamed: shard -> records skipped so far
    logged: dict[str, float] = dataclasses.field(default_factory=dict)  # what the due hooks returned so far


def run_hooks(hooks: list["Hook"], info: StepInfo) -> None:
    """Runs each due hook in order, adding its metrics to `info.logged` (which later hooks can read)."""
    for hook in hooks:
        if hook.due(info.step, info.is_last):
            info.logged.update(hook.run(info))


class Hook:
    """Due every `every_steps` steps (0: never periodically) and, if `at_end`, after the last step."""

    every_steps: int = 1
    at_end: bool = True

    def due(self, step: int, is_last: bool) -> bool:
        return (is_last and self.at_end) or (self.every_steps > 0 and step % self.every_steps == 0)

    def before_step(self, step: int) -> None:
        pass

    def run(self, info: StepInfo) -> dict[str, float]:
        return {}

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class Periodic(Hook):
    """`fn(info) -> metrics` every `every_steps` steps and at the end (an eval, a checkpoint save)."""

    def __init__(self, every_steps: int, fn: Callable[[StepInfo], dict[str, float]], at_end: bool = True):
        self.every_steps, self.fn, self.at_end = every_steps, fn, at_end

    def run(self, info: StepInfo) -> dict[str, float]:
        return self.fn(info)


class Log(Hook):
    """The step's metrics, throughput and data counters every `every_steps`, on the first step of the run
    and on the last. Reading the metrics is the loop's only regular sync with the device."""

    def __init__(self, every_steps: int, first_step: int, throughput: metrics_lib.Throughput,
                 nonfinite: "NonFiniteGuard", batch_checksums: bool, loss_watch: Any = None):
        self.every_steps, self.first_step = every_steps, first_step
        self.throughput, self.nonfinite, self.batch_checksums = throughput, nonfinite, batch_checksums
        self.loss_watch = loss_watch  # safeguards.LossWatch: warns when the loss climbs far above its start

    def due(self, step: int, is_last: bool) -> bool:
        return super().due(step, is_last) or step == self.first_step + 1

    def run(self, info: StepInfo) -> dict[str, float]:
        logged = metrics_lib.to_python(info.metrics)  # syncs with the device
        if self.loss_watch is not None:
            logged.update(self.loss_watch.check(info.step, logged))
        logged.update(self.throughput.measure(info.step))
        logged["data/num_skipped"] = float(info.num_skipped)  # unusable records this process skipped in this run
        for shard, count in sorted(info.skipped_by_shard.items()):  # their shards, for streamed sources
            logged[f"data/skipped/{shard}"] = float(count)
        logged["nonfinite_skipped_total"] = float(self.nonfinite.total)
        if info.epochs is not None:
            logged["data/epoch"] = float(np.max(info.epochs))
        if self.batch_checksums:  # exact in a float: CRC32 < 2**53
            batch = info.local_batch
            logged["data/batch_crc32"] = float(zlib.crc32(batch["images"].tobytes() + batch["tokens"].tobytes()))
        return logged


class NonFiniteGuard(Hook):
    """Counts steps whose loss, gradient or update was not finite (the step skipped the update) and stops the run
    after `max_in_a_row` in a row. Reads each step's flag only after the next step is dispatched, so the
    check never leaves the accelerator idle."""

    def __init__(self, max_in_a_row: int, checkpointer: Any):
        self.max_in_a_row = max_in_a_row
        self.checkpointer = checkpointer  # names the last good checkpoint in the error
        self.total = 0
        self.in_a_row = 0
        self._held: tuple[int, Any] | None = None

    def run(self, info: StepInfo) -> dict[str, float]:
        self.check_previous_and_hold(info.step, info.metrics)
        return {}

    def finish(self) -> None:
        self.check_held()

    def check_previous_and_hold(self, step: int, step_metrics: Any) -> None:
        self.check_held()
        self._held = (step, step_metrics["nonfinite"])

    def held_step_finite(self) -> bool:
        """Whether the step just held (not yet counted) had a finite loss, gradient and update; waits for it."""
        return self._held is None or not int(self._held[1])

    def check_held(self) -> None:
        if self._held is None:
            return
        step, flag = self._held
        self._held = None
        if not int(flag):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        logger.warning("Step %d had a non-finite loss, gradient or update; it was skipped (%d in a row).", step, self.in_a_row)
        if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            # Steps inside the streak are never saved (see held_step_finite), so the latest is from before it.
            latest = self.checkpointer.latest_step()
            where = (f"step {latest} in {self.checkpointer.root} (saved before the streak began at step "
                     f"{step - self.in_a_row + 1})" if latest is not None else "none saved yet")
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row had a NaN or Inf loss, gradient or update, the last at step {step}. "
                f"Last good checkpoint: {where}. Lower optim.learning_rate, check the data, or raise "
                "max_nonfinite_steps."
            )


class ProfileWindow(Hook):
    """Traces steps [first, last) with jax.profiler (view in TensorBoard's profile tab or Perfetto)."""

    def __init__(self, logdir: str, first: int, last: int):
        if last < first:
            raise ValueError(f"profile_steps ({first}, {last}) must be (first, last) with last >= first.")
        self.logdir, self.first, self.last = logdir, first, last
        self.active = False

    def due(self, step: int, is_last: bool) -> bool:
        return self.active and step == self.last - 1

    def before_step(self, step: int) -> None:
        if step == self.first and self.last > self.first and jax.process_index() == 0:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def run(self, info: StepInfo) -> dict[str, float]:
        jax.block_until_ready(info.metrics)  # the trace must hold the whole step
        self.close()
        return {}

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logger.info("Wrote a profile of steps %d-%d to %s", self.first, self.last - 1, self.logdir)


class Write(Hook):
    """Writes the step's log line (whatever the hooks before it returned) to every writer, every step
    that has one; keeps the latest value of each metric."""

    def __init__(self, writer: Any):
        self.writer = writer
        self.last: dict[str, float] = {}

    def run(self, info: StepInfo) -> dict[str, float]:
        if info.logged:
            self.writer.write(info.step, info.logged)
            self.last.update(info.logged)
        return {}


class Progress(Hook):
    """Moves the terminal progress bar every step."""

    def __init__(self, console: metrics_lib.ConsoleWriter):
        self.console = console

    def run(self, info: StepInfo) -> dict[str, float]:
        self.console.advance(info.step)
        return {}


class Preemption(Hook):
    """On SIGTERM (see preemption.py), checked every step but the last: saves the state (`save` returns
    whether it did: a non-finite step is not saved) and asks the loop to stop, so a rerun continues."""

    at_end = False

    def __init__(self, watch: Any, save: Callable[[int, Any], bool]):
        self.watch, self.save = watch, save
        self.stop_requested = False

    def due(self, step: int, is_last: bool) -> bool:
        return not is_last

    def run(self, info: StepInfo) -> dict[str, float]:
        if self.watch.should_stop(info.step):
            saved = self.save(info.step, info.state)
            logger.warning("Preempted: %s; rerun the same command to continue.",
                           f"saved step {info.step}" if saved else f"step {info.step} was not finite, so not saved")
            self.stop_requested = True
        return {}

    def close(self) -> None:
        self.watch.close()
