"""Meshes and the mapping from logical axis names to mesh axes; nothing else.

Parameters and activations carry logical names (models/layers.py); `config.mesh.axis_rules` maps each
name to mesh axes. A dimension that a mesh axis does not divide is replicated instead of failing, so
small models run on any mesh.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AxisRules = Sequence[tuple[str, Any]]


def resolve_mesh_shape(shape: Sequence[int], axis_names: Sequence[str], num_devices: int) -> tuple[int, ...]:
    """Replaces the one -1 entry by the remaining devices and checks the product."""
    shape = tuple(int(size) for size in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {shape} has more than one -1; at most one axis takes the rest.")
    known = math.prod(size for size in shape if size != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape {shape} cannot fill {num_devices} devices: {num_devices} is not divisible by "
                f"the fixed axes' product {known}."
            )
        shape = tuple(num_devices // known if size == -1 else size for size in shape)
    if math.prod(shape) != num_devices:
        named = dict(zip(axis_names, shape))
        raise ValueError(
            f"mesh.shape {named} uses {math.prod(shape)} devices but {num_devices} are available; make the "
            "product match or set one axis to -1."
        )
    return shape


def create_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types (flax logical partitioning and jit shardings need Auto, not Explicit)."""
    devices = list(devices) if devices is not None else jax.devices()
    resolved = resolve_mesh_shape(shape, axis_names, len(devices))
    return jax.make_mesh(
        resolved, tuple(axis_names), axis_types=(AxisType.Auto,) * len(resolved), devices=devices
    )


def rules_as_tuples(axis_rules: AxisRules) -> tuple[tuple[str, Any], ...]:
    """Normalises rules read from a config (lists become tuples), dropping nothing."""
    normalised = []
    for name, axes in axis_rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        normalised.append((name, axes))
    return tuple(normalised)


def _mesh_axes_for(logical_name: str | None, rules: AxisRules, mesh: Mesh) -> tuple[str, ...]:
    if logical_name is None:
        return ()
    for name, axes in rules:
        if name == logical_name:
            if axes is None:
                return ()
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            return tuple(axis for axis in axes if axis in mesh.shape)
    raise ValueError(
        f"Logical axis {logical_name!r} has no entry in mesh.axis_rules; add one, e.g. "
        f"({logical_name!r}, None) to replicate it. Names present: {', '.join(name for name, _ in rules)}."
    )


def spec_for_shape(
    logical_names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: AxisRules
) -> PartitionSpec:
    """Mesh axes for one array; a dimension not divisible by its axes' size is replicated, and a mesh axis
    is used at most once (first dimension wins)."""
    used: set[str] = set()
    entries = []
    for name, dim in zip(logical_names, shape):
        axes = tuple(axis for axis in _mesh_axes_for(name, rules, mesh) if axis not in used)
        size = math.prod(mesh.shape[axis] for axis in axes)
        if not axes or dim % size:
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules: AxisRules) -> Any:
    """Tree of NamedShardings for a tree of (possibly logically boxed) abstract arrays, e.g. the output
    of `jax.eval_shape(model.init, ...)`. Unboxed leaves are replicated."""

    def leaf_sharding(leaf: Any) -> Any:
        if isinstance(leaf, nn.LogicallyPartitioned) and not hasattr(leaf.value, "shape"):
            # A box around an empty subtree (optax's MaskedNode: no moments for a frozen parameter) holds
            # no array; the subtree itself keeps the structure the shardings must mirror.
            return leaf.value
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = spec_for_shape(leaf.names, leaf.value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(
        leaf_sharding, abstract_tree, is_leaf=lambda leaf: isinstance(leaf, nn.LogicallyPartitioned)
    )


def batch_axes(mesh: Mesh, rules: AxisRules) -> tuple[str, ...]:
    """The mesh axes the batch is split over (the "act_batch" rule)."""
    return _mesh_axes_for("act_batch", rules, mesh)


def batch_sharding(mesh: Mesh, rules: AxisRules) -> NamedSharding:
    """Sharding for [batch, ...] inputs: leading dim over the batch axes, the rest replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def data_parallel_size(mesh: Mesh, rules: AxisRules) -> int:
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh, rules))


def check_batch_size(global_batch_size: int, mesh: Mesh, rules: AxisRules, what: str = "data.batch_size") -> None:
    """Refuses a global batch the data-parallel devices cannot split evenly, saying by how much."""
    shards = data_parallel_size(mesh, rules)
    remainder = global_batch_size % shards
    if remainder:
        lower = global_batch_size - remainder
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {shards} data-parallel devices "
            f"(mesh axes {batch_axes(mesh, rules)}): {remainder} too many. Use {lower} or {lower + shards}."
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {jax.process_count()} processes."
        )


def check_accumulation(global_batch_size: int, accum_steps: int, mesh: Mesh, rules: AxisRules) -> None:
    """Each device's rows must split evenly into `accum_steps` microbatches."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be at least 1, got {accum_steps}.")
    per_device = global_batch_size // data_parallel_size(mesh, rules)
    if per_device % accum_steps:
        raise ValueError(
            f"accum_steps={accum_steps} does not divide the per-device batch of {per_device} "
            f"(data.batch_size={global_batch_size} over {data_parallel_size(mesh, rules)} devices); pick a "
            f"divisor of {per_device}."
        )


def host_local_to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Builds global arrays from each process's share of the batch (its rows, in process order)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
