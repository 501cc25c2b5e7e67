"""The contrastive_loss evaluator (validation loss) against a loss written out in numpy."""
import ml_collections
import numpy as np
import pytest

from siglip_jax.config import default_config, eval_config, source_config, validate
from siglip_jax.data.tokenizers import ByteTokenizer
from siglip_jax.evaluation import runner

IMAGE_SIZE, MAX_LEN, EMBED = 8, 16, 6


def _records(count, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
        captions = [f"caption {index} number {k} {rng.integers(1000)}" for k in range(3)]
        if index == 2:
            captions = ["", "  ", captions[0]]  # the first non-empty caption is the one used
        records.append({"id": str(index), "image": image, "captions": captions})
    records.insert(5, {"id": "uncaptioned", "image": records[0]["image"], "captions": [""]})
    return records


class _ContentEmbedder:
    """Embeddings computed from the pixels and token ids themselves, so a wrong pairing changes the loss."""

    def images(self, params, images):
        flat = np.asarray(images, np.float32).reshape(len(images), -1)[:, :EMBED] - 127.5
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)

    def texts(self, params, tokens):
        flat = np.asarray(tokens, np.float32)[:, :EMBED] + np.asarray(tokens, np.float32)[:, EMBED:2 * EMBED] * 0.5
        flat = flat - flat.mean(axis=1, keepdims=True) + 1e-3
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def _numpy_loss(x, y, t, b, name):
    logits = np.exp(t) * x.astype(np.float64) @ y.T.astype(np.float64)
    n = len(x)
    if name == "sigmoid":
        signs = 2 * np.eye(n) - 1
        return np.sum(np.log1p(np.exp(-signs * (logits + b)))) / n
    def cross_entropy(m):
        return np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m))
    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_validation_loss_matches_numpy_over_training_size_batches(name):
    records = _records(23)  # 22 captioned pairs: batches of 8 -> 2 full batches, 6 pairs left out
    tokenizer = ByteTokenizer(MAX_LEN)
    loss_config = ml_collections.ConfigDict(dict(name=name, max_temperature=0.0))
    evaluator = runner.ContrastiveLossSet(records, tokenizer, IMAGE_SIZE, 8, loss_config)
    t, b = np.float32(np.log(3.0)), np.float32(-2.0)
    result = evaluator.evaluate(_ContentEmbedder(), {"t": t, "b": b})

    pairs = [(r["image"], next(c for c in r["captions"] if c.strip())) for r in records if any(c.strip() for c in r["captions"])]
    embedder = _ContentEmbedder()
    x = embedder.images(None, np.stack([image for image, _ in pairs[:16]]))
    y = embedder.texts(None, tokenizer([caption for _, caption in pairs[:16]]))
    expected = np.mean([_numpy_loss(x[s:s + 8], y[s:s + 8], float(t), float(b), name) for s in (0, 8)])
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["num_pairs"] == 16 and result["num_skipped"] == 1
    # The batch size matters (more negatives per positive): the same pairs at batch 16 score differently.
    whole = runner.ContrastiveLossSet(records, tokenizer, IMAGE_SIZE, 16, loss_config).evaluate(embedder, {"t": t, "b": b})
    assert whole["loss"] == pytest.approx(_numpy_loss(x, y, float(t), float(b), name), rel=1e-5)
    assert abs(whole["loss"] - result["loss"]) > 1e-3


def test_validation_loss_clamps_the_temperature_as_training_does():
    records = _records(9)
    loss_config = ml_collections.ConfigDict(dict(name="sigmoid", max_temperature=2.0))
    evaluator = runner.ContrastiveLossSet(records, ByteTokenizer(MAX_LEN), IMAGE_SIZE, 8, loss_config)
    clamped = evaluator.evaluate(_ContentEmbedder(), {"t": np.float32(np.log(50.0)), "b": np.float32(0.0)})
    at_two = evaluator.evaluate(_ContentEmbedder(), {"t": np.float32(np.log(2.0)), "b": np.float32(0.0)})
    assert clamped["loss"] == pytest.approx(at_two["loss"], rel=1e-6)


def test_fewer_pairs_than_one_training_batch_is_refused_naming_the_batch_size():
    loss_config = ml_collections.ConfigDict(dict(name="sigmoid", max_temperature=0.0))
    with pytest.raises(ValueError, match=r"fewer than one batch \(data.batch_size=128\)"):
        runner.ContrastiveLossSet(_records(10), ByteTokenizer(MAX_LEN), IMAGE_SIZE, 128, loss_config)


def test_contrastive_loss_is_a_valid_eval_kind_built_at_the_training_batch_size():
    config = default_config()
    config.evals.val = eval_config("contrastive_loss", source_config("demo", split="eval"))
    validate(config)
    config.data.batch_size, config.model.image.image_size = 16, IMAGE_SIZE
    evaluators = runner.build_evaluators(config, ByteTokenizer(MAX_LEN), lambda source: _records(40))
    assert isinstance(evaluators["val"], runner.ContrastiveLossSet) and evaluators["val"].batch_size == 16
    assert evaluators["val"].num_pairs == 32
