"""One loader for every model source, straight into the target shardings, and one override rule.

Sources, told apart by content:
  * a training workdir, its checkpoints/ directory or one step's directory (the latest complete step,
    or `step`): Orbax restores the parameters (no optimizer state) into sharded abstract targets, so
    no array is ever whole on one device;
  * a file written by `export.py --format params`;
  * an HF SigLIP directory (config.json + model.safetensors);
  * a big_vision SigLIP `.npz` (config inferred from the shapes).
Files are read on the host and each leaf is put onto its target sharding.

Placement: `shardings` (a tree like the parameters, or like some of their groups) if given, else the
training layout on `mesh` if given, else workdirs on the first local device and files as read (numpy).

The override rule (`with_overrides`), the same for train.py's init_from, eval.py, export.py, inference
and search: the model (`config.model`), its loss (what its scores mean) and its tokenizer and
lowercasing (`TRAINED_WITH_KEYS`) always come from the source, since the weights were trained with them;
a config the user passes supplies every other key (evals, mesh, data sources, batch sizes), and one
that disagrees on those keys is warned about, naming both values; without one, the source's config is
used whole.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from siglip_jax import config as config_lib
from siglip_jax.io import big_vision, checkpoint, checkpoint_params, hf, params as params_lib
from siglip_jax.models import init_mapping, layout
from siglip_jax.models.two_towers import param_shardings
from siglip_jax.runtime import sharding, storage

logger = logging.getLogger(__name__)

# (source config, {group: tree of arrays' shapes and dtypes}) -> None; raises to refuse a source before anything is placed.
ShapeCheck = Callable[[ml_collections.ConfigDict, dict], None]


def is_workdir(path: str) -> bool:
    """True for what checkpoint_params.restore_params reads (a directory that is not an HF export)."""
    location = storage.path(path)  # gs:// workdirs too
    return location.is_dir() and not (location / "config.json").exists()


def _load_workdir(source: str, step: int | None, mesh: Mesh | None, shardings: Any, check: ShapeCheck | None,
                  weights: str) -> params_lib.ExportedParams:
    """A workdir's checkpoint: `step`, or the newest one that reads, as training resumes (the ones that do not
    are named in a warning); all unreadable is one error naming each step and what to do."""
    steps = checkpoint_params.workdir_steps(source) if step is None else None
    candidates = list(reversed(steps)) if steps else [step]
    failures = []
    for candidate in candidates:
        try:
            config, saved_shapes = checkpoint_params.saved_params_shapes(source, step=candidate, weights=weights)
        except Exception as error:  # noqa: BLE001 -- any read failure means: try the previous step
            if step is not None or not steps or isinstance(error, _ANSWERS):
                raise
            failures.append(checkpoint.describe_read_failure(candidate, error, checkpoint_params.checkpoints_root(source)))
            continue
        if check is not None:
            check(config, saved_shapes)  # a model that does not fit is the user's to fix, in every step alike
        try:
            params, config = checkpoint_params.restore_params(
                source, step=candidate, mesh=mesh, shardings=_target_shardings(config, mesh, shardings), weights=weights)
        except Exception as error:  # noqa: BLE001
            if step is not None or not steps or isinstance(error, _ANSWERS):
                raise
            failures.append(checkpoint.describe_read_failure(candidate, error, checkpoint_params.checkpoints_root(source)))
            continue
        if failures:
            logger.warning("Could not read the newer checkpoint(s) of %s (%s); using step %d, the newest that reads, "
                           "as a resumed run would.", source, "; ".join(failures), candidate)
        name, data = params_lib.tokenizer_asset(config)
        return params_lib.ExportedParams(config=config, params=params, tokenizer_file_name=name, tokenizer_file=data)
    raise checkpoint.NoCheckpointError(
        f"No checkpoint of {source} can be read: {'; '.join(failures)}. Delete those step directories, or "
        "start a new workdir.")


# Errors that answer the request rather than report a damaged file (a run without EMA asked for its EMA):
# every older step would answer the same.
_ANSWERS = (checkpoint.NoCheckpointError, checkpoint.CheckpointMismatchError)


def _target_shardings(config: ml_collections.ConfigDict, mesh: Mesh | None, shardings: Any) -> Any:
    if shardings is not None or mesh is None:
        return shardings
    return param_shardings(config.model, mesh, sharding.rules_as_tuples(config.mesh.axis_rules))


def _read_file(path: str) -> params_lib.ExportedParams:
    if params_lib.is_params_file(path):
        return params_lib.load_params_file(path)
    if os.path.isfile(path) and path.endswith(".npz"):
        config, params = big_vision.load_npz(path)
        return params_lib.ExportedParams(config=config, params=params)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        config, params = hf.load_hf_directory(path)
        return params_lib.ExportedParams(config=config, params=params)
    raise FileNotFoundError(
        f"Cannot load a model from {path!r}: expected an exported params file (export.py --format params), a "
        "big_vision .npz, an HF SigLIP directory (config.json + model.safetensors) or a training workdir."
    )


def load_model(
    source: str,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    shardings: Any = None,
    check: ShapeCheck | None = None,
    weights: str = "raw",
) -> params_lib.ExportedParams:
    """Config (validated), parameters and tokenizer file of the model at `source` (see the module doc).

    With `shardings` covering only some parameter groups, only those groups are loaded. `check` sees
    the source's config and parameter shapes before any array is placed. `weights` ("raw" or "ema",
    config.WEIGHTS) picks, in a training workdir, the trained parameters or their exponential moving
    average (optim.ema_decay); a file holds one set of weights, so it takes "raw" only.
    """
    source = os.fspath(source)
    if weights not in config_lib.WEIGHTS:
        raise ValueError(f"Unknown weights {weights!r}; valid: {', '.join(config_lib.WEIGHTS)}.")
    if is_workdir(source):
        return _load_workdir(source, step, mesh, shardings, check, weights)
    if step is not None:
        raise ValueError(f"A step ({step}) was given with {source!r}, which is not a training workdir; "
                         "a step selects a checkpoint of a workdir only.")
    if weights != "raw":
        raise ValueError(f"{source!r} is not a training workdir, so it holds one set of weights and no EMA: drop "
                         "--weights ema (an export made with --weights ema already holds the EMA as its weights).")
    exported = _read_file(source)
    if check is not None:
        check(exported.config, checkpoint.abstract_like(exported.params))
    targets = _target_shardings(exported.config, mesh, shardings)
    if targets is None:
        return exported
    # Each leaf goes straight to its own sharding; a subset of groups loads only those groups.
    params = {group: jax.device_put(exported.params[group], targets[group]) for group in targets}
    return params_lib.ExportedParams(exported.config, params, exported.tokenizer_file_name, exported.tokenizer_file)


def source_from_flags(workdir: str | None, checkpoint_arg: str | None) -> tuple[str, int | None]:
    """(source, step) for load_model from the CLIs' --workdir / --checkpoint flags: a workdir with
    an optional step, or a path alone."""
    if workdir:
        return workdir, checkpoint_params.parse_step(checkpoint_arg)
    if checkpoint_arg:
        if not storage.path(checkpoint_arg).exists():  # a params file in a bucket too
            raise FileNotFoundError(f"--checkpoint {checkpoint_arg!r} does not exist; pass a workdir, an exported "
                                    "params file, an HF directory or a big_vision .npz (or --workdir W --checkpoint STEP).")
        return checkpoint_arg, None
    raise ValueError("Pass --workdir (optionally with --checkpoint STEP) or --checkpoint PATH.")


# Keys besides `model` that the weights were trained with, so a loaded model keeps its source's: the loss
# decides what its scores mean (evaluation/scores.py), the tokenizer which ids its text tower learned.
TRAINED_WITH_KEYS = ("loss.name", "loss.max_temperature", "data.tokenizer", "data.tokenizer_path", "data.lowercase")


def with_overrides(loaded: ml_collections.ConfigDict, override: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The config to use with a loaded model: `override`'s keys with the loaded model's `model` group and
    TRAINED_WITH_KEYS, or the loaded config when there is no override (see the module doc). A recipe that
    disagrees on one of TRAINED_WITH_KEYS is warned about, naming both values; the source's wins."""
    if override is None:
        return loaded
    config = ml_collections.ConfigDict(override.to_dict())
    config.model = ml_collections.ConfigDict(loaded.model.to_dict())
    for key in TRAINED_WITH_KEYS:
        group, name = key.split(".")
        theirs, ours = loaded[group][name], config[group][name]
        if theirs != ours:
            logger.warning("The recipe sets %s=%r, but the loaded model was trained with %s=%r: using the model's "
                           "(its weights were trained with it). Drop the key from the recipe to silence this.",
                           key, ours, key, theirs)
            config[group][name] = theirs
    return config


class _NeedsFitting(Exception):
    """The source's arrays differ from the model's in layout or shape (or init_skip is set)."""


def initial_params(config: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
    """`params` with the groups in `config.init_towers` (all when empty) replaced by those of the model at
    `config.init_from` (any source above). A source whose arrays match the model's is loaded straight into
    `shardings`; one in the other scan layout, at another resolution or text length, or with `init_skip`
    regexes is fitted on the host first (models/layout.py, models/init_mapping.py), logging each change."""
    groups = tuple(config.init_towers) or tuple(params)
    unknown = sorted(set(groups) - set(params))
    if unknown:
        raise ValueError(f"init_towers names {unknown}; valid parameter groups: {sorted(params)}.")

    def check(_: ml_collections.ConfigDict, theirs_tree: dict) -> None:
        def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
            return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

        if config.init_skip or any(group not in theirs_tree or shapes(theirs_tree[group]) != shapes(params[group])
                                   for group in groups):
            raise _NeedsFitting

    try:
        loaded = load_model(config.init_from, shardings={group: shardings[group] for group in groups}, check=check).params
    except _NeedsFitting:
        source = layout.to_layout(load_model(config.init_from).params, config.model.scan_layers)
        try:
            fitted, notes = init_mapping.fit_params(source, jax.device_get(params), tuple(config.init_skip), groups)
        except ValueError as error:
            raise ValueError(f"init_from={config.init_from!r} does not fit this model. {error}") from None
        for note in notes:
            logger.warning("init_from: %s", note)
        loaded = {group: jax.device_put(fitted[group], shardings[group]) for group in groups}
    logger.warning("Initialised %s from %s.", ", ".join(groups), config.init_from)
    return {**params, **loaded}
