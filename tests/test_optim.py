import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax import optim
from siglip_jax.config import default_config


def _optim_config(**overrides):
    config = default_config().optim
    config.learning_rate = 1.0
    config.warmup_steps = 10
    for key, value in overrides.items():
        config[key] = value
    return config


def test_warmup_then_cosine():
    schedule = optim.learning_rate_schedule(_optim_config(schedule="cosine"), total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5)  # halfway through the decay: (1 + cos(pi/2)) / 2
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_rsqrt_linear_constant():
    rsqrt = optim.learning_rate_schedule(_optim_config(schedule="rsqrt"), total_steps=1000)
    assert float(rsqrt(10)) == pytest.approx(1.0)
    assert float(rsqrt(10 + 30)) == pytest.approx(0.5)  # sqrt(10 / 40)
    linear = optim.learning_rate_schedule(_optim_config(schedule="linear", end_learning_rate_fraction=0.1), 110)
    assert float(linear(60)) == pytest.approx(0.55)
    constant = optim.learning_rate_schedule(_optim_config(schedule="constant"), 110)
    assert float(constant(100)) == pytest.approx(1.0)


def test_weight_decay_only_on_kernels():
    params = {
        "img": {"embedding": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "pos_embedding": jnp.ones((1, 2, 2)),
                "LayerNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)}},
        "txt": {"Embed_0": {"embedding": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2))}},
        "t": jnp.ones(()), "b": jnp.ones(()),
    }
    mask = optim.weight_decay_mask(params)
    assert mask["img"]["embedding"]["kernel"] and mask["txt"]["head"]["kernel"]
    assert not any([mask["img"]["embedding"]["bias"], mask["img"]["pos_embedding"], mask["img"]["LayerNorm_0"]["scale"],
                    mask["txt"]["Embed_0"]["embedding"], mask["t"], mask["b"]])


def test_adamw_update_matches_hand_computation():
    """First AdamW step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> update = -lr * (g/|g| + wd * p)."""
    config = _optim_config(schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0, learning_rate=0.01)
    optimizer = optim.build_optimizer(config, total_steps=10)
    params = {"dense": {"kernel": jnp.array([2.0, -4.0]), "bias": jnp.array([1.0])}}
    grads = {"dense": {"kernel": jnp.array([0.5, -0.25]), "bias": jnp.array([3.0])}}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    eps = config.eps
    expected_kernel = -0.01 * (np.array([0.5, -0.25]) / (np.abs([0.5, -0.25]) + eps) + 0.1 * np.array([2.0, -4.0]))
    np.testing.assert_allclose(updates["dense"]["kernel"], expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(updates["dense"]["bias"], [-0.01], rtol=1e-5)  # no decay on biases


def test_global_norm_clipping():
    config = _optim_config(name="sgd", b1=0.0, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip_norm=1.0)
    optimizer = optim.build_optimizer(config, total_steps=10)
    params = {"w": jnp.zeros(2)}
    updates, _ = optimizer.update({"w": jnp.array([3.0, 4.0])}, optimizer.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)  # norm 5 clipped to 1
