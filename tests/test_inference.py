"""Inference API and the exported-params file: loading every source, preprocessing and tokenizer as in
training, bucketed compilation, scores."""
import os

import jax
import numpy as np
import pytest

from siglip_jax.data import images as images_lib
from siglip_jax.data.tokenizers import make_tokenizer
from siglip_jax.inference import predictor
from siglip_jax.io import big_vision, params as params_lib
from siglip_jax.models import two_towers
from tests.helpers import tiny_config
from tests.params_helpers import random_params
from siglip_jax.data.tokenizers import train_sentencepiece


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, random_params(config)


@pytest.fixture(scope="module")
def embedder(tiny):
    config, params = tiny
    return predictor.Predictor(config, params, make_tokenizer("byte", max_len=12), batch_size=4)


def _reference(config, params, pixels=None, token_ids=None):
    model = two_towers.build_model(config.model)
    method, inputs = (model.embed_images, pixels) if pixels is not None else (model.embed_texts, token_ids)
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))(params, inputs))


def test_params_file_round_trip(tmp_path, tiny):
    config, params = tiny
    path = str(tmp_path / "model.msgpack")
    params_lib.save_params_file(path, config, params)
    assert params_lib.is_params_file(path)
    loaded = params_lib.load_params_file(path)
    assert loaded.config.to_dict() == config.to_dict()
    np.testing.assert_array_equal(loaded.params["txt"]["head"]["kernel"], params["txt"]["head"]["kernel"])
    assert loaded.tokenizer_file == b""

    params_lib.save_params_file(path, config, params, dtype="bfloat16")
    half = params_lib.load_params_file(path).params
    assert half["img"]["embedding"]["kernel"].dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(half["img"]["embedding"]["kernel"].astype(np.float32),
                               params["img"]["embedding"]["kernel"], rtol=1e-2)
    with pytest.raises(ValueError, match="valid: float32, bfloat16"):
        params_lib.save_params_file(path, config, params, dtype="int8")


def test_embeddings_match_the_model(tmp_path, tiny, embedder):
    config, params = tiny
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8) for i in range(6)]
    paths = []
    for index, image in enumerate(originals[:3]):
        paths.append(str(tmp_path / f"{index}.png"))
        with open(paths[-1], "wb") as file:
            file.write(images_lib.encode_image(image))
    inputs = paths + originals[3:]  # paths and arrays mixed
    pixels = np.stack([images_lib.eval_transform(image, 16) for image in originals])
    expected = _reference(config, params, pixels=pixels)
    actual = embedder.embed_images(inputs)
    assert actual.shape == (6, 32)
    np.testing.assert_allclose(actual, expected, atol=1e-5)

    texts = ["a dog", "a cat on a mat", "x"]
    expected_texts = _reference(config, params, token_ids=make_tokenizer("byte", max_len=12)(texts))
    np.testing.assert_allclose(embedder.embed_texts(texts), expected_texts, atol=1e-5)


def test_each_bucket_compiles_once(tiny):
    config, params = tiny
    embedder = predictor.Predictor(config, params, make_tokenizer("byte", max_len=12), batch_size=4)
    for count in (3, 4, 1, 2, 3, 7, 9):
        assert embedder.embed_texts(["t"] * count).shape == (count, 32)
    # 7 = 4 + 3 -> buckets 4, 4; 9 = 4 + 4 + 1. Every request reused one of these four executables.
    assert embedder.compiled_buckets == (("text", 1), ("text", 2), ("text", 4))


def test_scores(embedder):
    images = [np.full((16, 16, 3), value, np.uint8) for value in (0, 128, 255)]
    texts = ["black", "grey"]
    probabilities = embedder.score(images, texts)
    temperature, bias = embedder.temperature_and_bias()
    logits = temperature * embedder.embed_images(images) @ embedder.embed_texts(texts).T + bias
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    np.testing.assert_allclose(embedder.score_pairs(images[:2], texts), np.diag(probabilities), rtol=1e-5)
    with pytest.raises(ValueError, match="as many images as texts"):
        embedder.score_pairs(images, texts)


def test_load_every_source(tmp_path, tiny):
    config, params = tiny
    captions = ["a dog runs on the beach", "two children play in the snow", "a man rides a red bicycle"] * 20
    spm_path = str(tmp_path / "tiny.model")
    train_sentencepiece(captions, spm_path, vocab_size=28, model_type="unigram")
    sp_config = tiny_config(**{"data.tokenizer": "sentencepiece", "data.tokenizer_path": spm_path,
                               "model.text.vocab_size": 28})
    sp_params = random_params(sp_config)
    params_path = str(tmp_path / "model.msgpack")
    params_lib.save_params_file(params_path, sp_config, sp_params)
    os.remove(spm_path)  # the params file carries the tokenizer itself

    loaded = predictor.load(params_path)
    assert loaded.tokenizer.vocab_size == 28
    token_ids = loaded.tokenizer(["a dog"])
    np.testing.assert_allclose(loaded.embed_texts(["a dog"]), _reference(sp_config, sp_params, token_ids=token_ids),
                               atol=1e-5)

    npz_path = str(tmp_path / "model.npz")
    big_vision.save_npz(npz_path, params)
    from_npz = predictor.load(npz_path)
    ids = np.ones((1, 12), np.int32)
    np.testing.assert_allclose(from_npz.embed_token_ids(ids), _reference(config, params, token_ids=ids), atol=1e-6)

    with pytest.raises(Exception, match="checkpoint"):  # a directory with no checkpoint in it
        predictor.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Cannot load a model"):
        predictor.load(str(tmp_path / "missing"))


def test_eval_pairs_of_a_softmax_model_are_its_softmax_with_its_own_tokenizer(tmp_path, tiny, caplog):
    """Issue 15 item 6: a softmax-trained model has no trained bias, so its pair scores are the softmax of
    t*cos over the texts given, and the output says so; a recipe asking for sigmoid scores and lowercased
    text is overruled by the model's own config, with a warning naming both."""
    import json
    import logging

    from siglip_jax.evaluation import command

    _, params = tiny
    config = tiny_config(**{"loss.name": "softmax"})
    model_path = str(tmp_path / "softmax.msgpack")
    params_lib.save_params_file(model_path, config, params)
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["A Red Circle", "a BLUE square", "Two Green Stars"]
    with open(tmp_path / "pairs.jsonl", "w") as stream:
        for index, (image, text) in enumerate(zip(pixels, texts)):
            path = tmp_path / f"{index}.png"
            path.write_bytes(images_lib.encode_image(image))
            stream.write(json.dumps({"image": str(path), "text": text}) + "\n")
    recipe = tiny_config(**{"loss.name": "sigmoid", "data.lowercase": True})
    with caplog.at_level(logging.WARNING):
        results = command.run(recipe, None, model_path, str(tmp_path / "pairs.jsonl"))
    assert "loss.name='sigmoid', but the loaded model was trained with loss.name='softmax'" in caplog.text
    assert "data.lowercase=True, but the loaded model was trained with data.lowercase=False" in caplog.text
    assert results["probability"].startswith("softmax over the texts") and "softmax over the texts" in results["table"]

    tokens = make_tokenizer("byte", max_len=12)(texts)  # as trained: not lowercased
    image_embeddings = _reference(config, params, pixels=np.stack(pixels))
    text_embeddings = _reference(config, params, token_ids=tokens)
    logits = np.exp(params["t"]) * image_embeddings @ text_embeddings.T
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose([pair["probability"] for pair in results["pairs"]], np.diag(softmax), rtol=1e-4)
