"""Ours <-> Hugging Face SiglipModel, with transformers (CPU PyTorch) as the independent reference:
embeddings agree to 1e-4 in float32 on the same pixels and token ids, and HF -> ours -> HF is lossless."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing may be downloaded

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="HF export tests need PyTorch (CPU): pip install -r requirements-test.txt")
transformers = pytest.importorskip(
    "transformers", reason="HF export tests need transformers: pip install -r requirements-test.txt")

from siglip_jax.io import hf, hf_state_dict
from siglip_jax.io import safetensors_file  # noqa: E402
from siglip_jax.models import two_towers  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402
from tests.params_helpers import random_params  # noqa: E402
from siglip_jax.data.tokenizers import train_sentencepiece  # noqa: E402

TOLERANCE = 1e-4


def our_embeddings(config, params, pixels, token_ids):
    model = two_towers.build_model(config.model)
    # Jitted: one compile per tower instead of one per operation (eager), the same function.
    images = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_images))(params, pixels)
    texts = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.embed_texts))(params, token_ids)
    return np.asarray(images), np.asarray(texts)


def hf_embeddings(hf_model, pixels, token_ids):
    with torch.no_grad():
        images = hf_model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        texts = hf_model.get_text_features(input_ids=torch.from_numpy(token_ids.astype(np.int64)))
    images, texts = (getattr(out, "pooler_output", out).numpy() for out in (images, texts))
    return (images / np.linalg.norm(images, axis=-1, keepdims=True),
            texts / np.linalg.norm(texts, axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    pixels = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    token_ids = rng.integers(3, 259, (3, 12)).astype(np.int32)
    token_ids[0, 5:] = 1  # EOS + padding, as the tokenizer writes it
    return pixels, token_ids


def test_export_matches_transformers(tmp_path, inputs):
    config = tiny_config(2)
    params = random_params(config)
    hf.save_hf_directory(str(tmp_path), config, params)
    hf_model = transformers.SiglipModel.from_pretrained(str(tmp_path)).eval()

    pixels, token_ids = inputs
    ours_images, ours_texts = our_embeddings(config, params, pixels, token_ids)
    theirs_images, theirs_texts = hf_embeddings(hf_model, pixels, token_ids)
    image_error = np.abs(ours_images - theirs_images).max()
    text_error = np.abs(ours_texts - theirs_texts).max()
    print(f"max |ours - HF|: images {image_error:.2e}, texts {text_error:.2e}")
    assert image_error < TOLERANCE and text_error < TOLERANCE
    assert hf_model.logit_scale.item() == pytest.approx(float(params["t"]), abs=1e-7)
    assert hf_model.logit_bias.item() == pytest.approx(float(params["b"]), abs=1e-7)
    assert os.path.isfile(tmp_path / "preprocessor_config.json")


def test_hf_to_ours_to_hf_is_lossless(tmp_path, inputs):
    hf_config = transformers.SiglipConfig(
        text_config=dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=12, projection_size=32,
                         bos_token_id=None, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4))
    torch.manual_seed(0)
    hf_model = transformers.SiglipModel(hf_config).eval()
    hf_model.save_pretrained(str(tmp_path / "released"))

    config, params = hf.load_hf_directory(str(tmp_path / "released"))
    assert (config.model.text.width, config.model.text.num_heads, config.model.image.width) == (48, 4, 32)
    pixels, token_ids = inputs
    ours = our_embeddings(config, params, pixels, token_ids)
    theirs = hf_embeddings(hf_model, pixels, token_ids)
    for mine, reference in zip(ours, theirs):
        assert np.abs(mine - reference).max() < TOLERANCE

    hf.save_hf_directory(str(tmp_path / "again"), config, params)
    original = safetensors_file.load_file(str(tmp_path / "released" / hf.WEIGHTS_NAME))
    round_trip = safetensors_file.load_file(str(tmp_path / "again" / hf.WEIGHTS_NAME))
    assert set(round_trip) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(round_trip[key], value, err_msg=key)


def test_bfloat16_checkpoint_reads(tmp_path):
    config = tiny_config(2)
    params = random_params(config)
    hf.save_hf_directory(str(tmp_path), config, params, dtype="bfloat16")
    hf_model = transformers.SiglipModel.from_pretrained(str(tmp_path))
    assert hf_model.logit_scale.dtype == torch.bfloat16
    _, loaded = hf.load_hf_directory(str(tmp_path))
    np.testing.assert_allclose(np.asarray(loaded["img"]["pos_embedding"], np.float32),
                               params["img"]["pos_embedding"], atol=1e-2)


def test_sentencepiece_tokenizer_is_exported(tmp_path):
    captions = ["a dog runs on the beach", "two children play in the snow", "a man rides a red bicycle"] * 20
    spm_path = tmp_path / "tiny.model"
    train_sentencepiece(captions, spm_path, vocab_size=28, model_type="unigram")
    config = tiny_config(2, **{"data.tokenizer": "sentencepiece", "data.tokenizer_path": str(spm_path),
                            "model.text.vocab_size": 28, "data.lowercase": True})
    hf.save_hf_directory(str(tmp_path / "out"), config, random_params(config))
    hf_tokenizer = transformers.SiglipTokenizer.from_pretrained(str(tmp_path / "out"))
    from siglip_jax.data.tokenizers import make_tokenizer
    ours = make_tokenizer("sentencepiece", max_len=12, path=str(spm_path), lowercase=True)
    text = "a dog runs"  # no punctuation: HF's SiglipTokenizer strips it, ours keeps it
    theirs = hf_tokenizer([text], padding="max_length", max_length=12, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(theirs, ours([text]))
    loaded_config, _ = hf.load_hf_directory(str(tmp_path / "out"))
    assert loaded_config.data.tokenizer == "sentencepiece" and loaded_config.data.lowercase


@pytest.mark.parametrize("override, message", [
    ({"model.embed_dim": 16}, "embed_dim"),
    ({"model.image.pooling": "gap"}, "pooling"),
])
def test_unexportable_models_are_refused(tmp_path, override, message):
    config = tiny_config(2, **override)
    with pytest.raises(ValueError, match=message):
        hf.save_hf_directory(str(tmp_path), config, {})


def test_unsupported_hf_config_is_refused():
    with pytest.raises(ValueError, match="hidden_act"):
        hf.config_from_hf({"model_type": "siglip", "vision_config": {"hidden_act": "relu"}, "text_config": {}})
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf({"model_type": "clip"})


def test_scan_layers_model_exports_to_hf_and_loads_back(tmp_path, inputs):
    """A scan_layers model (blocks stacked on a layers axis) exports to HF, transformers' embeddings equal
    ours, and the HF directory loads back into a scan_layers model with the same embeddings."""
    config = tiny_config(2, **{"model.scan_layers": True})
    params = random_params(config)
    assert "encoderblock" in params["img"]["Transformer"]  # stacked, the layout HF does not have
    hf.save_hf_directory(str(tmp_path), config, params)
    hf_model = transformers.SiglipModel.from_pretrained(str(tmp_path)).eval()
    pixels, token_ids = inputs
    ours = our_embeddings(config, params, pixels, token_ids)
    theirs = hf_embeddings(hf_model, pixels, token_ids)
    for mine, reference in zip(ours, theirs):
        assert np.abs(mine - reference).max() < TOLERANCE
    loaded = hf_state_dict.from_hf_state_dict(hf.read_hf_state_dict(str(tmp_path)), config.model)
    for mine, reference in zip(our_embeddings(config, loaded, pixels, token_ids), theirs):
        assert np.abs(mine - reference).max() < TOLERANCE
