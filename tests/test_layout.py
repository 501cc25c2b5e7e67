"""Scanned <-> unrolled parameter layouts: hand-built trees, and a scan_layers model given an unrolled
model's parameters computes what the unrolled model does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from siglip_jax.io import hf_state_dict
from siglip_jax.models import layout, two_towers
from tests.helpers import tiny_config


def _unrolled():
    return {"img": {"Transformer": {"encoderblock_0": {"k": np.array([1.0, 2.0])},
                                    "encoderblock_1": {"k": np.array([3.0, 4.0])},
                                    "encoder_norm": {"scale": np.ones(2)}}},
            "t": np.array(0.5)}


def test_stack_and_unroll_hand_built():
    stacked = layout.stack_blocks(_unrolled())
    assert set(stacked["img"]["Transformer"]) == {"encoderblock", "encoder_norm"}
    np.testing.assert_array_equal(stacked["img"]["Transformer"]["encoderblock"]["k"], [[1.0, 2.0], [3.0, 4.0]])
    back = layout.unroll_blocks(stacked)
    np.testing.assert_array_equal(back["img"]["Transformer"]["encoderblock_1"]["k"], [3.0, 4.0])
    assert jax.tree.structure(back) == jax.tree.structure(_unrolled())
    # Idempotent: a tree already in the asked layout comes back unchanged.
    assert jax.tree.structure(layout.to_layout(stacked, scan_layers=True)) == jax.tree.structure(stacked)
    assert jax.tree.structure(layout.to_layout(_unrolled(), scan_layers=False)) == jax.tree.structure(_unrolled())


def test_gaps_in_block_numbers_are_refused():
    tree = {"encoderblock_0": {"k": np.ones(1)}, "encoderblock_2": {"k": np.ones(1)}}
    with pytest.raises(ValueError, match=r"numbered 0..1; found \[0, 2\]"):
        layout.stack_blocks(tree)


def test_unrolled_params_run_a_scanned_model_identically_and_export_alike():
    config = tiny_config(2)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 1, 259)
    unrolled_model = two_towers.build_model(config.model)
    params = nn.meta.unbox(unrolled_model.init(jax.random.key(0), images, tokens))["params"]
    scanned_config = tiny_config(2, **{"model.scan_layers": True})
    scanned_model = two_towers.build_model(scanned_config.model)
    stacked = layout.to_layout(jax.device_get(params), scan_layers=True)
    expected = jax.jit(unrolled_model.apply)({"params": params}, images, tokens)  # one compile, not one per op
    actual = jax.jit(scanned_model.apply)({"params": jax.tree.map(jnp.asarray, stacked)}, images, tokens)
    for ours, reference in zip(actual, expected):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    # The scanned model exports the same HF tensors, and loads back stacked.
    exported = hf_state_dict.to_hf_state_dict(stacked, scanned_config.model)
    reference_export = hf_state_dict.to_hf_state_dict(params, config.model)
    assert exported.keys() == reference_export.keys()
    for key in exported:
        np.testing.assert_array_equal(exported[key], reference_export[key])
    loaded = hf_state_dict.from_hf_state_dict(exported, scanned_config.model)
    assert jax.tree.structure(loaded) == jax.tree.structure(stacked)
