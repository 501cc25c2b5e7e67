"""Ours <-> HF `transformers.Siglip2Model` (NaFlex), transformers (CPU PyTorch) as the independent reference:
image embeddings at several aspect ratios and text embeddings agree to 1e-4, import and export both ways."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="HF export tests need PyTorch (CPU): pip install -r requirements-test.txt")
transformers = pytest.importorskip("transformers", reason="HF export tests need transformers")

from siglip_jax.io import loading  # noqa: E402
from siglip_jax.data import naflex  # noqa: E402
from siglip_jax.io import formats, hf
from siglip_jax.io import safetensors_file  # noqa: E402
from siglip_jax.models import two_towers  # noqa: E402

TOLERANCE = 1e-4
PATCH, BUDGET = 4, 24
# Aspect ratios from 1:3 to 3:1 (no one-column grid: see test_naflex on torch's 1-column resize).
SHAPES = ((20, 40), (40, 13), (16, 16), (9, 33), (30, 10))


def _normalised(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def hf_embeddings(hf_model, packed, token_ids):
    patches, masks, grids = zip(*(naflex.unpack(item) for item in packed))
    with torch.no_grad():
        images = hf_model.get_image_features(
            pixel_values=torch.from_numpy(np.stack(patches).astype(np.float32) / 127.5 - 1),
            pixel_attention_mask=torch.from_numpy(np.stack(masks).astype(np.int64)),
            spatial_shapes=torch.tensor(grids))
        texts = hf_model.get_text_features(input_ids=torch.from_numpy(token_ids.astype(np.int64)))
    return tuple(_normalised(getattr(out, "pooler_output", out).numpy()) for out in (images, texts))


def our_embeddings(config, params, packed, token_ids):
    model = two_towers.build_model(config.model)
    images = model.apply({"params": params}, packed, method=model.embed_images)
    texts = model.apply({"params": params}, token_ids, method=model.embed_texts)
    return np.asarray(images), np.asarray(texts)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small random Siglip2Model saved by transformers, as a user downloads one."""
    hf_config = transformers.Siglip2Config(
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=12, projection_size=32,
                         bos_token_id=None, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=PATCH, num_patches=16))
    torch.manual_seed(0)
    model = transformers.Siglip2Model(hf_config).eval()
    with torch.no_grad():  # HF zero-initialises some biases and the probe; random values test the mapping
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    directory = str(tmp_path_factory.mktemp("siglip2") / "released")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    pictures = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in SHAPES]
    packed = np.stack([naflex.naflex_transform(picture, PATCH, BUDGET) for picture in pictures])
    token_ids = rng.integers(3, 300, (len(SHAPES), 12)).astype(np.int32)
    token_ids[0, 5:] = 1
    return packed, token_ids


def test_import_matches_transformers(released, inputs):
    directory, hf_model = released
    config, params = hf.load_hf_directory(directory)
    assert (config.model.image.kind, config.model.image.posemb_grid) == ("naflex", 4)
    grids = {naflex.unpack(item)[2] for item in inputs[0]}
    assert len(grids) >= 4 and any(rows * cols < BUDGET for rows, cols in grids)  # padding is exercised
    ours = our_embeddings(config, params, *inputs)
    theirs = hf_embeddings(hf_model, *inputs)
    errors = [float(np.abs(mine - reference).max()) for mine, reference in zip(ours, theirs)]
    print(f"max |ours - HF|: images {errors[0]:.2e}, texts {errors[1]:.2e}")
    assert max(errors) < TOLERANCE


def test_export_loads_back_in_transformers(released, inputs, tmp_path):
    directory, _ = released
    exported = loading.load_model(directory)
    output = str(tmp_path / "export")
    formats.export_model(exported, "hf", output)  # what export.py --format hf runs
    with open(os.path.join(output, "config.json")) as file:
        written = json.load(file)
    assert written["model_type"] == "siglip2" and written["vision_config"]["num_patches"] == 16
    reloaded = transformers.Siglip2Model.from_pretrained(output).eval()
    ours = our_embeddings(exported.config, exported.params, *inputs)
    for mine, reference in zip(ours, hf_embeddings(reloaded, *inputs)):
        assert np.abs(mine - reference).max() < TOLERANCE
    original = safetensors_file.load_file(os.path.join(directory, hf.WEIGHTS_NAME))
    round_trip = safetensors_file.load_file(os.path.join(output, hf.WEIGHTS_NAME))
    assert set(round_trip) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(round_trip[key], value, err_msg=key)
    processor = transformers.Siglip2ImageProcessorPil.from_pretrained(output)
    assert (processor.patch_size, processor.max_num_patches) == (PATCH, 16)


def test_scan_layers_naflex_model_exports(inputs, tmp_path):
    from tests.helpers import tiny_config
    from tests.params_helpers import random_params

    config = tiny_config(2, **{"model.image.kind": "naflex", "model.image.max_num_patches": 16,
                            "model.scan_layers": True, "model.text.max_len": 12})
    params = random_params(config)
    hf.save_hf_directory(str(tmp_path), config, params)
    hf_model = transformers.Siglip2Model.from_pretrained(str(tmp_path)).eval()
    packed, token_ids = inputs
    token_ids = np.minimum(token_ids, config.model.text.vocab_size - 1)
    for mine, reference in zip(our_embeddings(config, params, packed, token_ids),
                               hf_embeddings(hf_model, packed, token_ids)):
        assert np.abs(mine - reference).max() < TOLERANCE


def test_unresizable_position_grid_is_refused():
    with pytest.raises(ValueError, match=r"num_patches=20 is not a square"):
        hf.config_from_hf({"model_type": "siglip2", "vision_config": {"num_patches": 20}, "text_config": {}})
