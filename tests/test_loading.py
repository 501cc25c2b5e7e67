"""The one loader's override rule and placement, the scoring function per loss, the embedder's buckets."""
import jax
import numpy as np
import pytest

from siglip_jax.config import DEFAULT_AXIS_RULES
from siglip_jax.inference import scores
from siglip_jax.inference.embedder import Embedder, bucket_size
from siglip_jax.io import loading, params as params_lib
from siglip_jax.models import two_towers
from siglip_jax.runtime import sharding
from tests.helpers import tiny_config
from tests.params_helpers import random_params


def test_override_takes_the_model_from_the_source_and_the_rest_from_the_recipe():
    saved = tiny_config(**{"model.image.width": 48, "data.eval_batch_size": 8})
    recipe = tiny_config(**{"model.image.width": 64, "data.eval_batch_size": 32})
    merged = loading.with_overrides(saved, recipe)
    assert merged.model.image.width == 48 and merged.data.eval_batch_size == 32
    assert loading.with_overrides(saved, None) is saved


def test_override_keeps_the_loss_and_tokenizer_the_model_was_trained_with(caplog):
    saved = tiny_config(**{"loss.name": "softmax", "loss.max_temperature": 100.0, "data.tokenizer": "sentencepiece",
                           "data.tokenizer_path": "/models/spm.model", "data.lowercase": True})
    recipe = tiny_config(**{"data.tokenizer_path": "/other/spm.model", "data.batch_size": 8})
    with caplog.at_level("WARNING"):
        merged = loading.with_overrides(saved, recipe)
    assert (merged.loss.name, merged.loss.max_temperature, merged.data.tokenizer, merged.data.tokenizer_path,
            merged.data.lowercase) == ("softmax", 100.0, "sentencepiece", "/models/spm.model", True)
    assert merged.data.batch_size == 8  # everything else is the recipe's
    assert ("The recipe sets data.tokenizer_path='/other/spm.model', but the loaded model was trained with "
            "data.tokenizer_path='/models/spm.model'") in caplog.text
    assert "loss.name='sigmoid', but the loaded model was trained with loss.name='softmax'" in caplog.text


def test_file_loads_straight_into_the_given_shardings_and_refuses_a_step(tmp_path):
    config = tiny_config()
    params = random_params(config)
    path = str(tmp_path / "model.msgpack")
    params_lib.save_params_file(path, config, params)
    mesh = sharding.create_mesh((4, 2, 1), ("data", "fsdp", "tensor"))
    loaded = loading.load_model(path, mesh=mesh)
    embedding = loaded.params["txt"]["Embed_0"]["embedding"]
    assert embedding.addressable_shards[0].data.shape == (259, 16)  # width 32 split over fsdp=2
    np.testing.assert_array_equal(np.asarray(embedding), params["txt"]["Embed_0"]["embedding"])
    only_image = loading.load_model(path, shardings={"img": jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[1]), params["img"])})
    assert set(only_image.params) == {"img"}
    with pytest.raises(ValueError, match="not a training workdir"):
        loading.load_model(path, step=3)


def test_source_from_flags_says_what_it_wants(tmp_path):
    assert loading.source_from_flags("/w", "12") == ("/w", 12)
    with pytest.raises(ValueError, match="must be a step number"):
        loading.source_from_flags("/w", "model.msgpack")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.source_from_flags(None, str(tmp_path / "missing"))


def test_scores_follow_the_loss():
    images = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], np.float32)
    dots = images @ texts.T
    t, b = 2.0, -1.0  # t = e^2
    sigmoid = 1 / (1 + np.exp(-(np.exp(t) * dots + b)))
    np.testing.assert_allclose(scores.match_probabilities(images, texts, t, b), sigmoid, rtol=1e-6)
    logits = np.exp(t) * dots
    over_texts = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    over_images = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(scores.match_probabilities(images, texts, t, b, "softmax"), over_texts, rtol=1e-5)
    np.testing.assert_allclose(scores.match_probabilities(images, texts, t, b, "softmax", over="images"),
                               over_images, rtol=1e-5)
    np.testing.assert_allclose(scores.pair_probabilities(images, texts[:2], t, b, "softmax"),
                               np.diag(np.exp(logits[:, :2]) / np.exp(logits[:, :2]).sum(axis=1, keepdims=True)), rtol=1e-5)
    # A model trained with the temperature clamped (loss.max_temperature) is scored with it clamped.
    clamped = 1 / (1 + np.exp(-(np.exp(1.5) * dots + b)))
    np.testing.assert_allclose(scores.match_probabilities(images, texts, t, b, max_temperature=np.exp(1.5)), clamped,
                               rtol=1e-5)
    assert scores.describe("softmax", over="images").startswith("softmax over the images given")
    assert scores.describe("sigmoid").startswith("sigmoid(t*cos + b) per pair")
    with pytest.raises(ValueError, match="valid: sigmoid, softmax"):
        scores.match_probabilities(images, texts, t, b, "hinge")


def test_buckets_are_powers_of_two_in_multiples_of_the_data_parallel_devices():
    assert [bucket_size(n, 32, 1) for n in (1, 3, 5, 17, 32)] == [1, 4, 8, 32, 32]
    assert [bucket_size(n, 48, 8) for n in (1, 9, 33, 48)] == [8, 16, 48, 48]
    assert bucket_size(5, 24, 6) == 12


def test_sharded_embedder_buckets_and_matches_the_model():
    config = tiny_config()
    mesh = sharding.create_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
    model = two_towers.build_model(config.model)
    params = random_params(config)
    embedder = Embedder(model, mesh, DEFAULT_AXIS_RULES, batch_size=16)
    tokens = np.random.default_rng(0).integers(3, 259, (19, 12)).astype(np.int32)
    got = embedder.texts(params, tokens)  # 16 + 3, the 3 padded to 8
    want = model.apply({"params": params}, tokens, method=model.embed_texts)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert embedder.compiled_buckets == (("text", 8), ("text", 16))
    assert embedder.texts(params, tokens[:0]).shape == (0, 32)
