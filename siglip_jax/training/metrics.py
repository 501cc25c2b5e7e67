"""Metric writers (terminal with a progress bar, JSON lines) and throughput accounting."""
from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from siglip_jax.runtime import storage

logger = logging.getLogger(__name__)

# Terminal columns: metric key -> (label, format).
CONSOLE_COLUMNS = {
    "loss": ("loss", "{:.4f}"),
    "caption_loss": ("caption", "{:.4f}"),  # SigLIP 2's caption decoder (model.decoder), within "loss"
    "self_distillation_loss": ("silc", "{:.4f}"),  # SigLIP 2's SILC and TIPS (model.distill), within "loss"
    "masked_prediction_loss": ("tips", "{:.4f}"),
    "learning_rate": ("lr", "{:.2e}"),
    "temperature": ("t", "{:.2f}"),
    "bias": ("b", "{:.2f}"),
    "examples_per_second": ("ex/s", "{:.1f}"),
}


def quiet_library_logs() -> None:
    """Show absl warnings and errors only (JAX and Orbax log every step of their work at INFO), unless the
    user asked for a level with --verbosity / -v. For CLIs, after flags are parsed."""
    from absl import flags
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (one transfer for the whole dict)."""
    host = jax.device_get(dict(metrics))
    return {key: float(np.asarray(value)) for key, value in host.items()}


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that is not JSON (the last one torn by a kill mid-write) is
    dropped with a warning naming the file and line, so a resume or a plot never fails on it; metrics
    that were NaN or Inf read back as None (see JsonlWriter)."""
    records = []
    for line_number, line in enumerate(storage.path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Dropped line %d of %s: not JSON (a write cut short?): %r", line_number, path, line[:80])
    return records


def _strict_json(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """NaN and Inf -> None: the literals json writes for them are not JSON, and other tools refuse them."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in metrics.items()}


class JsonlWriter:
    """Appends one JSON object per call: {"step": N, **metrics}. Appending keeps earlier runs' lines."""

    def __init__(self, path: str, keep_through_step: int | None = None):
        """`keep_through_step`: drop existing lines of later steps (a resumed run writes them again)."""
        self.path = storage.path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            records = read_jsonl(self.path)  # a torn line is left out (and named)
            if keep_through_step is not None:
                records = [record for record in records if record.get("step", 0) <= keep_through_step]
            if len(records) != len(lines) or (lines and not self.path.read_text().endswith("\n")):
                self.path.write_text("".join(json.dumps(_strict_json(record), allow_nan=False) + "\n" for record in records))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        storage.append_text(self.path, json.dumps(_strict_json({"step": step, **metrics}), allow_nan=False) + "\n")

    def close(self) -> None:
        pass


def format_eval(results: Mapping[str, float]) -> str:
    """One line per eval: recalls and accuracies as percentages, e.g. "image->text R@1 52.3 R@5 91.6 ..."."""
    groups = []
    for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        recalls = sorted(
            (int(key.split("@")[1]), value) for key, value in results.items()
            if key.startswith(f"{direction}/recall@")
        )
        if recalls:
            groups.append(label + " " + " ".join(f"R@{k} {100 * value:.1f}" for k, value in recalls))
    for key, label in (("mean_recall", "mean recall"), ("top1", "top-1"), ("top5", "top-5"),
                       ("mean_per_class_recall", "mean per-class")):
        if key in results:
            groups.append(f"{label} {100 * results[key]:.1f}")
    if results.get("num_skipped"):
        groups.append(f"skipped {int(results['num_skipped'])}")
    return " | ".join(groups) or ", ".join(f"{key} {value:.4g}" for key, value in sorted(results.items()))


class ConsoleWriter:
    """A progress bar over the training steps, with a line of the main metrics at each log step and a
    table of evaluation results."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=None if enabled else True)  # None: off when not a terminal

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        parts = [f"step {step:>6d}"]
        for key, (label, fmt) in CONSOLE_COLUMNS.items():
            if key in metrics:
                parts.append(f"{label} {fmt.format(metrics[key])}")
        if metrics.get("data/num_skipped"):
            parts.append(f"skipped {int(metrics['data/num_skipped'])}")
        lines = [" | ".join(parts)]
        evals: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            # "ema/<eval>/<metric>" is an eval of the parameters' moving average; "ema/decay" and the
            # like are step metrics, kept for metrics.jsonl.
            weights = " (EMA)" if key.startswith("ema/") else ""
            name, _, metric = key.removeprefix("ema/").partition("/")
            if metric and name != "data":
                evals.setdefault(name + weights, {})[metric] = value
        lines += [f"  eval {name}: {format_eval(results)}" for name, results in sorted(evals.items())]
        tqdm.tqdm.write("\n".join(lines))

    def close(self) -> None:
        self.bar.close()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it can (1.1 s of a
    2-core machine's start-up, for tensor types we never pass), and no PyTorch runs here."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalars as TensorBoard event files (tensorboardX: no TensorFlow needed)."""

    def __init__(self, logdir: str):
        SummaryWriter = _summary_writer_class()
        self.mirror = storage.LocalMirror(logdir)  # tensorboardX writes local files only; a bucket gets copies
        self.writer = SummaryWriter(self.mirror.local)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            # TensorBoard tags allow letters, digits and _.-/ only: "recall@5" -> "recall_at_5".
            self.writer.add_scalar(re.sub(r"[^A-Za-z0-9_.\-/]", "_", key.replace("@", "_at_")), value, step)
        self.writer.flush()
        self.mirror.sync()

    def close(self) -> None:
        self.writer.close()
        self.mirror.sync()


class MultiWriter:
    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write(step, metrics)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


# Dense bf16 peak TFLOP/s per device, by the start of jax's device_kind.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,  # SXM; the PCIe card is 756
    "NVIDIA H200": 989.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """The device's peak from the table (longest matching prefix), or `override` when positive."""
    if override > 0:
        return override
    matches = [kind for kind in PEAK_TFLOPS if device_kind.startswith(kind)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


class Throughput:
    """Examples per second between two calls of `measure`, from wall time (the caller syncs first)."""

    def __init__(self, global_batch_size: int, num_devices: int, flops_per_example: int | Callable[[int], int] = 0,
                 peak_tflops_per_device: float | None = None):
        """`flops_per_example` may be a function of the step (SigLIP 2's distillation adds views from a step on)."""
        self.global_batch_size = global_batch_size
        self.num_devices = num_devices
        self.flops_per_example = flops_per_example
        self.peak_tflops_per_device = peak_tflops_per_device
        self._time = time.perf_counter()
        self._step: int | None = None
        self._data_wait = 0.0

    def reset(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step
        self._data_wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Time the loop spent blocked on the input pipeline (an upper bound on the accelerator's idle
        time caused by input, since the step before may still be running meanwhile)."""
        self._data_wait += seconds

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        if self._step is None or step <= self._step:
            self.reset(step)
            return {}
        steps, seconds, data_wait = step - self._step, now - self._time, self._data_wait
        examples_per_second = steps * self.global_batch_size / seconds
        self.reset(step)
        measured = {
            "examples_per_second": examples_per_second,
            "examples_per_second_per_device": examples_per_second / self.num_devices,
            "seconds_per_step": seconds / steps,
            "data_wait_fraction": data_wait / seconds,
        }
        flops_per_example = self.flops_per_example(step) if callable(self.flops_per_example) else self.flops_per_example
        if flops_per_example:
            tflops = flops_per_example * examples_per_second / self.num_devices / 1e12
            measured["tflops_per_device"] = tflops
            if self.peak_tflops_per_device:
                measured["mfu"] = tflops / self.peak_tflops_per_device
        return measured
