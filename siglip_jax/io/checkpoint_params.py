"""The parameters and config of a training checkpoint, without its optimizer state or data position: what
evaluation, export and init_from read (through loading.load_model). Each array is restored by Orbax
straight into its target sharding."""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh, SingleDeviceSharding

from siglip_jax import config as config_lib
from siglip_jax.io import checkpoint
from siglip_jax.models.two_towers import param_shardings
from siglip_jax.runtime import sharding

logger = logging.getLogger(__name__)


def _resolve(path: str, step: int | None) -> tuple[epath.Path, int]:
    """(checkpoints root, step) for a workdir, its checkpoints directory or one step's directory."""
    path = checkpoint.as_path(path)
    if (path / checkpoint.STATE).is_dir():  # one step's directory
        if not path.name.isdigit():
            raise checkpoint.NoCheckpointError(f"{path} looks like a checkpoint but its name {path.name!r} is not a step number.")
        if step is not None and step != int(path.name):
            raise ValueError(f"Got the checkpoint directory of step {path.name} and also step={step}; give one.")
        return path.parent, int(path.name)
    root = checkpoints_root(path)
    if not root.is_dir():
        raise checkpoint.NoCheckpointError(f"No checkpoint at {path}: give a workdir, its {checkpoint.CHECKPOINTS_SUBDIR}/ or a step directory.")
    steps = complete_steps(root)
    if not steps:
        raise checkpoint.NoCheckpointError(f"No complete checkpoint under {root}.")
    if step is None:
        return root, steps[-1]
    if step not in steps:
        raise checkpoint.NoCheckpointError(f"No checkpoint of step {step} under {root}; the complete ones: {steps}.")
    return root, step


def complete_steps(root: epath.Path) -> list[int]:
    """The steps of the complete checkpoints under a checkpoints directory, oldest first."""
    with checkpoint.open_manager(root, read_only=True) as manager:
        return sorted(manager.all_steps())


def workdir_steps(path: str) -> list[int] | None:
    """The complete steps of a workdir or its checkpoints/ directory, oldest first; None for one step's
    directory (a choice already made)."""
    path = checkpoint.as_path(path)
    if (path / checkpoint.STATE).is_dir():
        return None
    root = checkpoints_root(path)
    return complete_steps(root) if root.is_dir() else None


def checkpoints_root(path: str | epath.Path) -> epath.Path:
    """A workdir's checkpoints/ directory, or `path` itself when it is that directory."""
    path = checkpoint.as_path(os.fspath(path))
    return path / checkpoint.CHECKPOINTS_SUBDIR if (path / checkpoint.CHECKPOINTS_SUBDIR).is_dir() else path


def read_saved_config(step_dir: epath.Path) -> ml_collections.ConfigDict:
    """The config saved with a checkpoint step, merged over the defaults and validated: the one way a
    saved config is read (see config.from_json)."""
    return config_lib.from_json(checkpoint.read_config_json(step_dir))


def _weights_field(saved_state: dict, weights: str, step_dir: epath.Path) -> str:
    """The TrainState field holding `weights` ("raw" or "ema", config.WEIGHTS), checked to be saved."""
    if weights not in config_lib.WEIGHTS:
        raise ValueError(f"Unknown weights {weights!r}; valid: {', '.join(config_lib.WEIGHTS)}.")
    field = "ema_params" if weights == "ema" else "params"
    if not isinstance(saved_state.get(field), dict):
        raise checkpoint.NoCheckpointError(
            f"The checkpoint {step_dir} has no EMA of the parameters (its run had optim.ema_decay=0); load its "
            "raw weights (--weights raw), or train with optim.ema_decay > 0.")
    return field


def saved_params_shapes(path: str, *, step: int | None = None, weights: str = "raw") -> tuple[ml_collections.ConfigDict, Any]:
    """(config, the shapes and dtypes of the parameters or, with weights="ema", of their EMA) of a
    checkpoint, from its metadata: no array is read."""
    root, step = _resolve(path, step)
    step_dir = root / str(step)
    saved_state = ocp.PyTreeCheckpointHandler().metadata(step_dir / checkpoint.STATE).tree
    return read_saved_config(step_dir), saved_state[_weights_field(saved_state, weights, step_dir)]


def restore_params(
    path: str, *, step: int | None = None, mesh: Mesh | None = None, shardings: Any = None, weights: str = "raw"
) -> tuple[Any, ml_collections.ConfigDict]:
    """The parameters (no optimizer state) and the config of a checkpoint; with weights="ema", the
    parameters' exponential moving average (optim.ema_decay) instead.

    `path` is a workdir, its checkpoints/ directory or one step's directory; without `step`, the latest
    complete checkpoint. Placement: `shardings` (a tree like the parameters, or a dict over some of
    their groups: only those are read) if given, else the training layout on `mesh` if given, else all
    on the first local device. Orbax restores each array straight into its sharding.
    """
    root, step = _resolve(path, step)
    step_dir = root / str(step)
    config = read_saved_config(step_dir)
    state_dir = step_dir / checkpoint.STATE
    with ocp.PyTreeCheckpointer() as reader:
        saved_state = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
        field = _weights_field(saved_state, weights, step_dir)
        saved_params = saved_state[field]
        if shardings is None:
            if mesh is not None:
                shardings = param_shardings(config.model, mesh, sharding.rules_as_tuples(config.mesh.axis_rules))
            else:
                device = SingleDeviceSharding(jax.local_devices()[0])
                shardings = jax.tree.map(lambda _: device, saved_params)
        if isinstance(shardings, dict) and set(shardings) < set(saved_params):
            saved_params = {group: saved_params[group] for group in shardings}
        target = checkpoint.abstract_like(saved_params, shardings)
        restored = reader.restore(
            state_dir,
            args=ocp.args.PyTreeRestore(
                item={field: target},
                restore_args={field: ocp.checkpoint_utils.construct_restore_args(target)},
                partial_restore=True,
            ),
        )
    params = restored[field]
    logger.info("Restored the %s parameters of %s", weights, step_dir)
    return params, config


def parse_step(text: str | None) -> int | None:
    """A --checkpoint STEP flag given with --workdir: a step number, or "latest" / "" / None for the latest
    complete checkpoint."""
    if text is None or text.strip().lower() in ("", "latest"):
        return None
    if not text.strip().isdigit():
        raise ValueError(f"--checkpoint {text!r} with --workdir must be a step number (e.g. 1000) or 'latest'; to "
                         "evaluate an exported file instead, pass --checkpoint PATH without --workdir.")
    return int(text)
