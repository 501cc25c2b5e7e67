"""big_vision .npz release format: key layout, config inferred from shapes, scanned blocks, round trip."""
import numpy as np
import pytest

from siglip_jax.io import big_vision
from tests.helpers import child_environment, tiny_config
from tests.params_helpers import random_params


def _flat(params, prefix=""):
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def test_npz_round_trip_and_key_layout(tmp_path):
    config = tiny_config(2, **{"model.text.width": 48, "model.text.num_heads": 4, "model.text.mlp_dim": 80})
    params = random_params(config)
    path = str(tmp_path / "siglip.npz")
    big_vision.save_npz(path, params)

    with np.load(path) as data:
        # The layout of big_vision's released SigLIP checkpoints.
        assert data["params/img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"].shape \
            == (32, 2, 16)
        assert data["params/img/MAPHead_0/probe"].shape == (1, 1, 32)
        assert data["params/txt/Encoder_0/encoder_norm/scale"].shape == (48,)
        assert data["params/t"].shape == (1,)

    loaded_config, loaded = big_vision.load_npz(path)
    expected, actual = _flat(params), _flat(loaded)
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    model, reference = loaded_config.model, config.model
    assert (model.image.patch_size, model.image.image_size, model.image.pooling) == (4, 16, "map")
    assert (model.image.width, model.image.depth, model.image.num_heads, model.image.mlp_dim) == (32, 2, 2, 64)
    assert (model.text.width, model.text.depth, model.text.num_heads, model.text.mlp_dim) == (48, 2, 4, 80)
    assert (model.text.vocab_size, model.text.max_len, model.embed_dim) == (259, 12, 0)
    assert reference.text.vocab_size == model.text.vocab_size


def test_scanned_blocks_are_unstacked(tmp_path):
    config = tiny_config(2)
    params = random_params(config)
    flat = {f"params/{key}": value for key, value in _flat(params).items()}
    for tower in ("img/Transformer", "txt/Encoder_0"):
        per_layer = [{k.split(f"encoderblock_{i}/")[1]: flat.pop(k) for k in list(flat)
                      if k.startswith(f"params/{tower}/encoderblock_{i}/")} for i in range(2)]
        for name in per_layer[0]:
            flat[f"params/{tower}/encoderblock/{name}"] = np.stack([layer[name] for layer in per_layer])
    path = str(tmp_path / "scanned.npz")
    np.savez(path, **flat)
    _, loaded = big_vision.load_npz(path)
    expected = _flat(params)
    for key, value in _flat(loaded).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_not_a_two_tower_checkpoint(tmp_path):
    path = str(tmp_path / "other.npz")
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a big_vision two-tower"):
        big_vision.load_npz(path)


def test_cli_converts_npz_to_params_file(tmp_path):
    import os
    import subprocess
    import sys

    from siglip_jax.io import params as params_lib

    config = tiny_config(2)
    params = random_params(config)
    npz_path, output = str(tmp_path / "release.npz"), str(tmp_path / "model.msgpack")
    big_vision.save_npz(npz_path, params)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = child_environment(None)
    result = subprocess.run(
        [sys.executable, "export.py", "--format", "params", "--checkpoint", npz_path, "--output", output,
         "--dtype", "bfloat16"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = params_lib.load_params_file(output)
    assert loaded.config.model.image.width == 32
    assert loaded.params["txt"]["Embed_0"]["embedding"].dtype == np.dtype("bfloat16")
