"""Checks the training loop runs so that a diverged, damaged or mismatched run says so instead of producing
a wrong result silently: each either stops before harm with one error naming what and the fix, or
carries on and reports (a log warning and a metric).

  * parameters restored from a checkpoint must be finite (a bit-flipped checkpoint is refused);
  * a resumed run's total_steps must reach past its checkpoint;
  * a run that restarts from step 0 beside an earlier run's metrics.jsonl moves that file aside;
  * a checkpoint is saved only when its step was finite (the trainer asks its NonFiniteGuard);
  * a loss far above the run's first loss is warned about and logged ("loss_over_start").
(An eval that meets non-finite embeddings reports it as a metric instead of raising: see
evaluation/runner.run_evaluators, the one way evals run.)
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from siglip_jax.runtime import storage

logger = logging.getLogger(__name__)


# ---- Restore ------------------------------------------------------------------------------------

def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the leaves of `tree` holding a NaN or Inf (e.g. "['img']['head']['kernel']")."""
    flags = jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)), tree)
    return [jax.tree_util.keystr(path) for path, finite in jax.tree_util.tree_leaves_with_path(jax.device_get(flags))
            if not bool(finite)]


def check_restored_params(params: Any, step: int, root: str) -> None:
    """Raises if the parameters restored from the checkpoint of `step` under `root` are not all finite:
    training from them would skip every update, and an eval or export would give NaN."""
    bad = nonfinite_leaves(params)
    if bad:
        raise FloatingPointError(
            f"The checkpoint of step {step} in {root} has NaN or Inf in {len(bad)} parameter arrays, e.g. "
            f"{', '.join(bad[:3])}: the file is damaged or was saved from a diverged run. Move "
            f"{os.path.join(str(root), str(step))} out of the way to resume from the checkpoint before it.")


def check_total_steps(restored_step: int, total_steps: int, root: str) -> None:
    """Warns when the restored run is already complete; raises when total_steps is below the checkpoint's
    step, since the run would otherwise end having done nothing, silently."""
    if restored_step > total_steps:
        raise ValueError(
            f"The checkpoint in {root} is at step {restored_step}, past total_steps={total_steps}, so there is nothing "
            f"to train. Raise total_steps above {restored_step} to continue this run (--config.total_steps=N), or "
            "start a new one in another workdir.")
    if restored_step == total_steps:
        logger.warning("The checkpoint in %s is already at total_steps=%d: nothing to train. Raise total_steps to "
                       "continue the run.", root, total_steps)


def set_aside_old_metrics(path: str) -> str | None:
    """A run starting at step 0 beside an earlier run's non-empty metrics file (its checkpoints emptied or
    never written) moves that file to path.1 (or .2, ...) with a warning, rather than dropping its lines.
    Returns where it went."""
    file = storage.path(path)
    if not file.exists() or not file.read_text().strip():
        return None
    number = 1
    while storage.path(f"{path}.{number}").exists():
        number += 1
    target = f"{path}.{number}"
    file.rename(storage.path(target))
    logger.warning("No checkpoint to resume from, but %s holds an earlier run's metrics: this run restarts from "
                   "step 0, and the old metrics were moved to %s.", path, target)
    return target


# ---- During the loop ----------------------------------------------------------------------------

class LossWatch:
    """Warns when the logged loss rises above `factor` times the first finite loss this run logged (the loss
    of a diverging run climbs while each step is still finite, so the non-finite guard never fires).
    Adds "loss_over_start" to every logged step; factor <= 0 turns it off."""

    def __init__(self, factor: float):
        self.factor = factor
        self.start: float | None = None
        self.above = False

    def check(self, step: int, logged: dict[str, float]) -> dict[str, float]:
        loss = logged.get("loss")
        if self.factor <= 0 or loss is None or not np.isfinite(loss):
            return {}
        if self.start is None:
            self.start = loss
        ratio = loss / self.start if self.start > 0 else 1.0
        if ratio > self.factor and not self.above:
            logger.warning(
                "The loss at step %d is %.4g, %.1f times the run's first logged loss %.4g (loss_rise_factor=%g): "
                "the run is diverging. Lower optim.learning_rate or raise optim.warmup_steps.", step, loss, ratio,
                self.start, self.factor)
        self.above = ratio > self.factor
        return {"loss_over_start": float(ratio)}
