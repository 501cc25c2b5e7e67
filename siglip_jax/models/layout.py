"""One parameter layout at the boundaries: the unrolled blocks `encoderblock_{i}` (a python loop over
layers; HF, big_vision releases and our params files) <-> the scanned stack `encoderblock` with a leading
layers axis (`model.scan_layers`, big_vision's `scan=True`). Pure functions on nested dicts of arrays,
applied on load and save so any checkpoint fits any model whatever `scan_layers` is."""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def _walk(tree: Any, convert) -> Any:
    if not isinstance(tree, dict):
        return tree
    return convert({key: _walk(value, convert) for key, value in tree.items()})


def _stack_here(node: dict) -> dict:
    indices = sorted(int(m.group(1)) for m in map(_BLOCK.match, node) if m)
    if not indices:
        return node
    if indices != list(range(len(indices))):
        raise ValueError(f"Blocks encoderblock_{{i}} must be numbered 0..{len(indices) - 1}; found {indices}.")
    if "encoderblock" in node:
        raise ValueError("A tree has both stacked 'encoderblock' and unrolled 'encoderblock_{i}' blocks.")
    blocks = [node[f"encoderblock_{i}"] for i in indices]
    out = {key: value for key, value in node.items() if not _BLOCK.match(key)}
    out["encoderblock"] = jax.tree.map(lambda *layers: np.stack([np.asarray(x) for x in layers]), *blocks)
    return out


def _unstack_here(node: dict) -> dict:
    if "encoderblock" not in node or not isinstance(node["encoderblock"], dict):
        return node
    stacked = node["encoderblock"]
    depths = {np.shape(leaf)[0] for leaf in jax.tree.leaves(stacked)}
    if len(depths) != 1:
        raise ValueError(f"Stacked 'encoderblock' arrays disagree on the layers axis: leading sizes {sorted(depths)}.")
    out = {key: value for key, value in node.items() if key != "encoderblock"}
    for layer in range(depths.pop()):
        out[f"encoderblock_{layer}"] = jax.tree.map(lambda x, layer=layer: np.asarray(x)[layer], stacked)
    return out


def stack_blocks(params: Any) -> Any:
    """Every `encoderblock_{i}` group -> one `encoderblock` whose arrays are [layers, ...]. Idempotent."""
    return _walk(params, _stack_here)


def unroll_blocks(params: Any) -> Any:
    """Every stacked `encoderblock` [layers, ...] -> `encoderblock_{i}` groups. Idempotent."""
    return _walk(params, _unstack_here)


def to_layout(params: Any, scan_layers: bool) -> Any:
    """`params` in the layout of a model with this `scan_layers`, whichever layout they come in."""
    return stack_blocks(params) if scan_layers else unroll_blocks(params)
