"""SigLIP 2 sizes: B/16 NaFlex has exactly transformers' Siglip2Model parameter count, and its 256k-token
text embedding is split over the tensor and fsdp axes, never whole on one device."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from siglip_jax import config as config_lib  # noqa: E402
from siglip_jax.runtime import sharding  # noqa: E402
from siglip_jax.models import two_towers  # noqa: E402

GEMMA_VOCAB = 256_000


def siglip2_b16_naflex(width=768):
    config = config_lib.default_config()
    config.model.image.kind = "naflex"
    config.model.image.variant = "B/16"
    config.model.image.max_num_patches = 256
    config.model.text.variant = "B"
    config.model.text.vocab_size = GEMMA_VOCAB
    config.model.text.max_len = 64
    if width != 768:  # a narrow, shallow model of the same layout
        for tower in (config.model.image, config.model.text):
            tower.width, tower.num_heads, tower.depth, tower.mlp_dim = width, 4, 1, 2 * width
    return config


def _recipe_model(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().model


def test_b16_naflex_parameter_count_equals_transformers():
    torch = pytest.importorskip("torch", reason="the reference count needs PyTorch")
    transformers = pytest.importorskip("transformers", reason="the reference count needs transformers")
    tower = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    hf_config = transformers.Siglip2Config(
        text_config=dict(vocab_size=GEMMA_VOCAB, max_position_embeddings=64, **tower),
        vision_config=dict(patch_size=16, num_patches=256, **tower))
    with torch.device("meta"):  # shapes only, nothing allocated
        theirs = sum(parameter.numel() for parameter in transformers.Siglip2Model(hf_config).parameters())
    ours_by_size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
        two_towers.abstract_params(siglip2_b16_naflex().model)))
    recipe = _recipe_model(os.path.join(os.path.dirname(__file__), "..", "configs", "siglip2_naflex.py"))
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(two_towers.abstract_params(recipe)))
    assert ours == ours_by_size  # configs/siglip2_naflex.py is this size
    print(f"SigLIP 2 B/16 NaFlex parameters: ours {ours:,}, transformers {theirs:,}")
    assert ours == theirs


def test_256k_text_embedding_is_split_over_tensor_and_fsdp():
    config = siglip2_b16_naflex(width=64)  # a small width: the split, not the size, is under test
    mesh = sharding.create_mesh((1, 4, 2), ("data", "fsdp", "tensor"), jax.devices()[:8])
    shardings = two_towers.param_shardings(config.model, mesh, sharding.rules_as_tuples(config.mesh.axis_rules))
    table = shardings["txt"]["Embed_0"]["embedding"]
    global_shape = (GEMMA_VOCAB, 64)
    per_device = table.shard_shape(global_shape)
    total_bytes = GEMMA_VOCAB * 64 * 4
    assert per_device == (GEMMA_VOCAB // 2, 64 // 4)  # vocab over tensor (2), width over fsdp (4)
    assert int(np.prod(per_device)) * 4 == total_bytes // 8
