import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.config import default_config
from siglip_jax.training import optim


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
    config = _optim_config(schedule="constant", warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0, learning_rate=0.01,
                           weight_decay_convention="optax")
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


def _sgd_config(**overrides):
    # Plain SGD (no momentum, no clipping, constant lr 0.1): the update is -0.1 * multiplier * gradient.
    settings = dict(name="sgd", b1=0.0, schedule="constant", warmup_steps=0, weight_decay=0.0,
                    grad_clip_norm=0.0, learning_rate=0.1)
    return _optim_config(**{**settings, **overrides})


def _tower_tree():
    return {
        "img": {"embedding": {"kernel": jnp.array([1.0, 1.0])},
                "Transformer": {"encoderblock_0": {"Dense_0": {"kernel": jnp.array([2.0, -4.0])}},
                                "encoderblock_1": {"Dense_0": {"kernel": jnp.array([1.0, 3.0])}}},
                "head": {"bias": jnp.array([0.5])}},
        "t": jnp.array(1.0),
    }


def _one_update(config, params, grads):
    optimizer = optim.build_optimizer(config, total_steps=10)
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    return updates, state


def test_lr_multipliers_and_layer_decay_hand_computed():
    """Depth 2, decay 0.5: block 0 gets 0.5^2, block 1 0.5^1, embeddings 0.5^3; the head x10 by regex."""
    params = _tower_tree()
    grads = jax.tree.map(jnp.ones_like, params)
    config = _sgd_config(lr_mults=(("img/head/.*", 10.0),), layer_decay=0.5)
    updates, _ = _one_update(config, params, grads)
    blocks = updates["img"]["Transformer"]
    np.testing.assert_allclose(blocks["encoderblock_0"]["Dense_0"]["kernel"], [-0.025, -0.025], rtol=1e-6)
    np.testing.assert_allclose(blocks["encoderblock_1"]["Dense_0"]["kernel"], [-0.05, -0.05], rtol=1e-6)
    np.testing.assert_allclose(updates["img"]["embedding"]["kernel"], [-0.0125, -0.0125], rtol=1e-6)
    np.testing.assert_allclose(updates["img"]["head"]["bias"], [-1.0], rtol=1e-6)
    np.testing.assert_allclose(updates["t"], -0.1, rtol=1e-6)


def test_layer_decay_on_stacked_blocks_is_per_slice():
    """A scan_layers stack [layers, ...] gets decay^(depth - i) on slice i, as the unrolled blocks do."""
    params = {"img": {"embedding": {"kernel": jnp.ones(2)},
                      "Transformer": {"encoderblock": {"Dense_0": {"kernel": jnp.ones((2, 3))}}}}}
    updates, _ = _one_update(_sgd_config(layer_decay=0.5), params, jax.tree.map(jnp.ones_like, params))
    np.testing.assert_allclose(updates["img"]["Transformer"]["encoderblock"]["Dense_0"]["kernel"],
                               [[-0.025] * 3, [-0.05] * 3], rtol=1e-6)
    np.testing.assert_allclose(updates["img"]["embedding"]["kernel"], [-0.0125] * 2, rtol=1e-6)


def test_weight_decay_conventions_hand_computed():
    """Adam's first step is sign(g) (up to eps). Constant lr 0.01, wd 0.01, lr x2 on the kernel:
    big_vision: -0.01 * 2 sign(g) - (lr/peak = 1) * 0.01 p; optax: -0.01 * 2 * (sign(g) + 0.01 p)."""
    params = {"dense": {"kernel": jnp.array([2.0, -4.0]), "bias": jnp.array([1.0])}}
    grads = {"dense": {"kernel": jnp.array([0.5, -0.25]), "bias": jnp.array([3.0])}}
    common = dict(schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip_norm=0.0, learning_rate=0.01,
                  lr_mults=(("dense/kernel", 2.0),), eps=1e-12)
    sign, kernel = np.array([1.0, -1.0]), np.array([2.0, -4.0])
    big_vision, _ = _one_update(_optim_config(weight_decay_convention="big_vision", **common), params, grads)
    np.testing.assert_allclose(big_vision["dense"]["kernel"], -0.02 * sign - 0.01 * kernel, rtol=1e-5)
    optax_style, _ = _one_update(_optim_config(weight_decay_convention="optax", **common), params, grads)
    np.testing.assert_allclose(optax_style["dense"]["kernel"], -0.02 * (sign + 0.01 * kernel), rtol=1e-5)
    np.testing.assert_allclose(big_vision["dense"]["bias"], [-0.01], rtol=1e-5)  # no decay, lr x1


def test_big_vision_decay_follows_the_schedule_not_the_learning_rate():
    """Halfway through a linear warmup lr(5) = peak / 2: big_vision decays by 0.5 wd p, optax by
    0.5 peak wd p. Zero gradients leave Adam's update at 0, so the decay is all there is."""
    params = {"w": {"kernel": jnp.array([4.0])}}
    zeros = {"w": {"kernel": jnp.zeros(1)}}
    for convention, expected in (("big_vision", -0.5 * 0.1 * 4.0), ("optax", -0.5 * 0.01 * 0.1 * 4.0)):
        config = _optim_config(schedule="constant", warmup_steps=10, weight_decay=0.1, grad_clip_norm=0.0,
                               learning_rate=0.01, weight_decay_convention=convention)
        optimizer = optim.build_optimizer(config, total_steps=20)
        state = optimizer.init(params)
        for _ in range(5):
            _, state = optimizer.update(zeros, state, params)
        updates, _ = optimizer.update(zeros, state, params)
        np.testing.assert_allclose(updates["w"]["kernel"], [expected], rtol=1e-5)


def test_wd_mults_replace_the_kernel_mask():
    params = {"a": {"kernel": jnp.array([1.0])}, "b": {"scale": jnp.array([2.0])}}
    config = _sgd_config(weight_decay=0.5, weight_decay_convention="optax", wd_mults=(("b/scale", 2.0),))
    updates, _ = _one_update(config, params, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(updates["a"]["kernel"], [0.0])  # not listed: no decay
    np.testing.assert_allclose(updates["b"]["scale"], [-0.1 * 0.5 * 2.0 * 2.0], rtol=1e-6)


def test_freeze_by_regex_zero_updates_and_no_moments():
    params = _tower_tree()
    grads = jax.tree.map(jnp.ones_like, params)
    config = _optim_config(freeze=(r"img/Transformer/encoderblock_0/.*", "img/embedding/.*"), weight_decay=0.0,
                           warmup_steps=0, schedule="constant")
    updates, state = _one_update(config, params, grads)
    assert not np.any(updates["img"]["Transformer"]["encoderblock_0"]["Dense_0"]["kernel"])
    assert not np.any(updates["img"]["embedding"]["kernel"])
    assert np.all(updates["img"]["Transformer"]["encoderblock_1"]["Dense_0"]["kernel"] < 0)
    # Adam keeps mu and nu for the trained 2 + 1 + 1 = 4 numbers only.
    moments = [leaf for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert sum(leaf.size for leaf in moments) == 2 * 4


def test_regex_matching_nothing_names_the_paths():
    params = _tower_tree()
    for key, value in (("lr_mults", (("img/MAPHead_0/.*", 0.1),)), ("freeze", ("txt/.*",)),
                       ("wd_mults", (("kernel", 1.0),))):
        optimizer = optim.build_optimizer(_sgd_config(**{key: value}), total_steps=10)
        with pytest.raises(ValueError, match=rf"optim.{key} regex .* matches no parameter path.*"
                                             r"img/Transformer/encoderblock_0/Dense_0/kernel"):
            optimizer.init(params)
    with pytest.raises(ValueError, match="must be > 0; freeze parameters with optim.freeze"):
        optim.build_optimizer(_sgd_config(lr_mults=(("t", 0.0),)), total_steps=10)
