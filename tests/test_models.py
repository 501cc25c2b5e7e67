import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siglip_jax.config import default_config
from siglip_jax.models import layers, sizes, two_towers
from tests.helpers import tiny_config


def _abstract_params(config):
    model = two_towers.build_model(config.model)
    size, length = config.model.image.image_size, config.model.text.max_len
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, length), jnp.int32)
    )
    return nn.unbox(variables)["params"]


def _count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_siglip_b16_parameter_counts():
    config = default_config()  # B/16, 224 px, vocab 32,000, 64 tokens
    params = _abstract_params(config)
    assert _count(params["img"]) == 92_884_224
    assert _count(params["txt"]) == 110_271_744
    assert _count(params) == 203_155_970
    assert params["t"].shape == () and params["b"].shape == ()


def test_so400m_parameter_count():
    config = default_config()
    config.model.image.variant = "So400m/14"
    config.model.text.variant = "So400m"
    config.model.text.max_len = 16
    assert _count(_abstract_params(config)) == 877_360_306


def test_b16_parameter_layout_matches_big_vision_names():
    params = _abstract_params(default_config())
    block = params["img"]["Transformer"]["encoderblock_0"]
    attention = block["MultiHeadDotProductAttention_0"]
    assert attention["query"]["kernel"].shape == (768, 12, 64)
    assert attention["out"]["kernel"].shape == (12, 64, 768)
    assert block["MlpBlock_0"]["Dense_0"]["kernel"].shape == (768, 3072)
    assert params["img"]["embedding"]["kernel"].shape == (16, 16, 3, 768)
    assert params["img"]["pos_embedding"].shape == (1, 196, 768)
    assert params["img"]["MAPHead_0"]["probe"].shape == (1, 1, 768)
    assert "head" not in params["img"]  # SigLIP's image tower has no projection
    assert params["txt"]["Embed_0"]["embedding"].shape == (32_000, 768)
    assert params["txt"]["pos_embedding"].shape == (1, 64, 768)
    assert params["txt"]["head"]["kernel"].shape == (768, 768)


@pytest.mark.parametrize("pooling", ["map", "gap", "tok"])
def test_embeddings_are_unit_norm_for_every_pooling(pooling):
    config = tiny_config(**{"model.image.pooling": pooling})
    model = two_towers.build_model(config.model)
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, 259)
    variables = model.init(jax.random.key(0), images, tokens)
    image_embeddings, text_embeddings = model.apply(variables, images, tokens)
    assert image_embeddings.shape == (3, 32) and text_embeddings.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(image_embeddings, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_embeddings, axis=-1), 1.0, rtol=1e-5)
    params = nn.unbox(variables)["params"]
    np.testing.assert_allclose(params["t"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(params["b"], -10.0)


def test_uint8_images_are_mapped_to_minus_one_one():
    config = tiny_config()
    model = two_towers.build_model(config.model)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    tokens = jnp.ones((2, 12), jnp.int32)
    variables = model.init(jax.random.key(0), pixels, tokens)
    from_uint8 = model.apply(variables, pixels, method=model.embed_images)
    from_float = model.apply(variables, pixels.astype(np.float32) / 127.5 - 1, method=model.embed_images)
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-6, atol=1e-6)


def test_text_tower_pools_the_last_position():
    """Changing any token but the last still changes the output (attention is unmasked), and the
    pooled vector is the last position's: equal inputs at that position are not enough."""
    config = tiny_config()
    model = two_towers.build_model(config.model)
    tokens = jnp.ones((1, 12), jnp.int32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), tokens)
    base = model.apply(variables, tokens, method=model.embed_texts)
    changed_first = model.apply(variables, tokens.at[0, 0].set(50), method=model.embed_texts)
    assert not np.allclose(base, changed_first)


def test_bfloat16_compute_keeps_float32_parameters():
    config = tiny_config(**{"model.dtype": "bfloat16"})
    model = two_towers.build_model(config.model)
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.ones((2, 12), jnp.int32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(variables)))
    image_embeddings, _ = model.apply(variables, jnp.zeros((2, 16, 16, 3)), jnp.ones((2, 12), jnp.int32))
    assert image_embeddings.dtype == jnp.float32  # normalised in float32


def test_size_table_equals_big_vision():
    """Every entry of big_vision's models/vit.py decode_variant: (width, depth, MLP width, heads)."""
    big_vision = {
        "mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
        "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
        "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "g-opt": (1536, 40, 6144, 16),
        "G": (1664, 48, 8192, 16), "G-opt": (1536, 48, 8192, 16), "e": (1792, 56, 15360, 16),
    }
    ours = {name: (s.width, s.depth, s.mlp_dim, s.num_heads) for name, s in sizes.SIZES.items()}
    assert ours == big_vision
    assert sizes.parse_variant("g-opt/14") == (sizes.SIZES["g-opt"], 14)


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Valid sizes: mu, Ti, S, M, B, L, So400m, H, g, g-opt, G, G-opt, e"):
        sizes.parse_variant("XL/16")


def test_variant_without_patch_size_is_refused():
    config = tiny_config(**{"model.image.variant": "mu"})
    with pytest.raises(ValueError, match="No patch size"):
        two_towers.build_model(config.model)


def test_image_size_not_multiple_of_patch_is_refused():
    config = tiny_config(2)
    model = two_towers.build_model(config.model)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)), jnp.ones((1, 12), jnp.int32))


def _stack_blocks(tower_params, encoder_name, depth):
    """Unscanned encoderblock_{i} params -> scanned `encoderblock` with a leading layers axis."""
    encoder = dict(tower_params[encoder_name])
    blocks = [encoder.pop(f"encoderblock_{i}") for i in range(depth)]
    encoder["encoderblock"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {**tower_params, encoder_name: encoder}


@pytest.mark.parametrize("remat_policy,depth,unroll", [("none", 2, 1), ("full", 2, 1), ("none", 3, 2), ("none", 2, 5)])
def test_scanned_layers_compute_the_same_function(remat_policy, depth, unroll):
    """A loop (unroll 1), a loop of two blocks with one left over (3 blocks, unroll 2), and straight-line code
    (unroll past the depth) over stacked blocks all compute the per-layer model's function."""
    plain = tiny_config(2, **{"model.remat_policy": remat_policy, "model.image.depth": depth, "model.text.depth": depth})
    scanned = tiny_config(2, **{"model.scan_layers": True, "model.scan_unroll": unroll, "model.remat_policy": remat_policy,
                                "model.image.depth": depth, "model.text.depth": depth})
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 259)
    plain_model, scanned_model = two_towers.build_model(plain.model), two_towers.build_model(scanned.model)
    params = nn.unbox(plain_model.init(jax.random.key(0), images, tokens))["params"]
    stacked = dict(params)
    stacked["img"] = _stack_blocks(params["img"], "Transformer", depth)
    stacked["txt"] = _stack_blocks(params["txt"], "Encoder_0", depth)
    scanned_shapes = nn.unbox(jax.eval_shape(scanned_model.init, jax.random.key(0), images, tokens))["params"]
    assert jax.tree.map(lambda x: x.shape, stacked) == jax.tree.map(lambda x: x.shape, scanned_shapes)
    expected = jax.jit(plain_model.apply)({"params": params}, images, tokens)  # one compile, not one per op
    got = jax.jit(scanned_model.apply)({"params": stacked}, images, tokens)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def _reference_attention(query, key, value):
    """Softmax attention in float64 numpy: [b, q, n, h] x [b, k, n, h] -> [b, q, n, h]."""
    scores = np.einsum("bqnh,bknh->bnqk", query, key) / np.sqrt(query.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknh->bqnh", weights, value)


@pytest.mark.parametrize("implementation", ["auto", "xla"])
def test_attention_matches_numpy(implementation):
    rng = np.random.default_rng(0)
    query, key, value = (rng.normal(size=(2, 5, 3, 8)).astype(np.float32) for _ in range(3))
    got = layers.dot_product_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), implementation)
    np.testing.assert_allclose(np.asarray(got), _reference_attention(query, key, value), atol=1e-5)


def test_auto_attention_uses_cudnn_exactly_where_it_applies():
    query = jnp.zeros((2, 16, 4, 64), jnp.bfloat16)
    step = jax.jit(lambda q: layers.dot_product_attention(q, q, q, "auto"))
    hlo = step.lower(query).compile().as_text()
    on_gpu = jax.default_backend() == "gpu"
    assert layers.cudnn_attention_supported(query) == on_gpu
    assert ("__cudnn$fmha" in hlo) == on_gpu
    # float32 inputs or a head dimension cuDNN does not take stay on XLA's attention everywhere.
    assert not layers.cudnn_attention_supported(query.astype(jnp.float32))
    assert not layers.cudnn_attention_supported(jnp.zeros((2, 16, 4, 12), jnp.bfloat16))


def test_unknown_attention_implementation_lists_the_valid_ones():
    config = default_config().model
    config.attention = "flash"
    with pytest.raises(ValueError, match="model.attention 'flash'.*auto, xla, cudnn"):
        two_towers.build_model(config)


def test_l2_normalize_keeps_a_zero_row_finite_and_others_exact():
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], np.float32)
    normalized = np.asarray(two_towers.l2_normalize(rows))
    np.testing.assert_array_equal(normalized[0], np.array([0.6, 0.8], np.float32))  # 3-4-5, exact in float32
    np.testing.assert_array_equal(normalized[1], [0.0, 0.0])  # was NaN without the floor
    assert np.all(np.isfinite(normalized)) and normalized[2, 0] < 1e-17
