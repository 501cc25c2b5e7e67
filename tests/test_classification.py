"""Zero-shot classification and SigLIP pair scores: hand-computed cases and numpy references."""
import math

import jax
import numpy as np
import pytest

from siglip_jax.evaluation import classification
from siglip_jax.inference import scores


# --- templates ------------------------------------------------------------------------------------
def test_imagenet_templates_are_80_distinct_with_one_slot():
    templates = classification.IMAGENET_TEMPLATES
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all(template.count("{}") == 1 for template in templates)
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."


def test_load_templates_skips_blank_lines(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n  a {} in the wild.  \n", encoding="utf-8")
    assert classification.load_templates(path) == ("a photo of a {}.", "a {} in the wild.")


def test_load_templates_names_the_line_without_slot(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\na photo of a dog.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: template 'a photo of a dog\.' has no '\{\}'"):
        classification.load_templates(path)


# --- class embeddings -----------------------------------------------------------------------------
def test_class_text_embeddings_normalise_then_average():
    prompt_vectors = {
        "a cat.": [3.0, 4.0],    # unit: (0.6, 0.8)
        "the cat!": [0.0, 2.0],  # unit: (0, 1)
        "a dog.": [-5.0, 0.0],   # unit: (-1, 0)
        "the dog!": [-1.0, 0.0],
    }
    calls = []

    def encode_texts(prompts):
        calls.append(prompts)
        return np.array([prompt_vectors[prompt] for prompt in prompts])

    embeddings = classification.class_text_embeddings(encode_texts, ["cat", "dog"], ["a {}.", "the {}!"])
    assert calls == [["a cat.", "the cat!"], ["a dog.", "the dog!"]]
    # cat: mean of units (0.3, 0.9), norm sqrt(0.9) -> (0.3162, 0.9487). Averaging the raw vectors
    # instead would give (1.5, 3) -> (0.447, 0.894): the longer prompt embedding would outvote.
    np.testing.assert_allclose(embeddings[0], [0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)], rtol=1e-6)
    np.testing.assert_allclose(embeddings[1], [-1.0, 0.0])


def test_class_text_embeddings_rejects_bad_encoder_output():
    with pytest.raises(ValueError, match=r"returned shape \(1, 2\) for 2 prompts"):
        classification.class_text_embeddings(lambda prompts: np.ones((1, 2)), ["cat"], ["a {}.", "the {}."])
    with pytest.raises(ValueError, match="has no '{}'"):
        classification.class_text_embeddings(lambda prompts: np.ones((1, 2)), ["cat"], ["a cat."])


# --- accuracy -------------------------------------------------------------------------------------
def test_classification_hand_computed_with_a_tie():
    # Class embeddings = identity and normalize=False, so image rows are the class scores directly.
    image_scores = np.array([
        [0.9, 0.1, 0.0],  # label 0: rank 1
        [0.2, 0.3, 0.1],  # label 0: rank 2
        [0.5, 0.5, 0.0],  # label 1: ties class 0 -> rank 2 (pessimistic)
        [0.1, 0.2, 0.3],  # label 2: rank 1
        [0.3, 0.2, 0.1],  # label 2: rank 3
    ], np.float32)
    labels = np.array([0, 0, 1, 2, 2])
    metrics = classification.classification_metrics(
        image_scores, labels, np.eye(3, dtype=np.float32), ks=(1, 2), block_size=2, normalize=False)
    # top1: images 0 and 3 -> 2/5. top2: all but image 4 -> 4/5.
    # per class top-1 recall: class 0 1/2, class 1 0/1, class 2 1/2 -> mean 1/3.
    assert metrics == pytest.approx({"top1": 0.4, "top2": 0.8, "mean_per_class_recall": 1 / 3})


def test_classification_matches_numpy_reference():
    rng = np.random.default_rng(0)
    num_images, num_classes, width = 41, 9, 12
    class_embeddings = rng.normal(size=(num_classes, width)).astype(np.float32)
    labels = rng.integers(0, num_classes - 1, size=num_images)  # the last class has no image
    images = (class_embeddings[labels] + 1.2 * rng.normal(size=(num_images, width))).astype(np.float32)
    metrics = classification.classification_metrics(images, labels, class_embeddings, block_size=8)

    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    logits = unit(images.astype(np.float64)) @ unit(class_embeddings.astype(np.float64)).T
    order = np.argsort(-logits, axis=1, kind="stable")
    top1 = order[:, 0] == labels
    top5 = (order[:, :5] == labels[:, None]).any(axis=1)
    present = np.unique(labels)
    per_class = [top1[labels == c].mean() for c in present]
    assert metrics["top1"] == pytest.approx(top1.mean())
    assert metrics["top5"] == pytest.approx(top5.mean())
    assert metrics["mean_per_class_recall"] == pytest.approx(np.mean(per_class))
    assert 0 < metrics["top1"] < 1  # neither trivial nor random


def test_labels_out_of_range_are_named():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*entry 1 is 3"):
        classification.classification_metrics(np.ones((2, 4), np.float32), [0, 3], np.eye(3, 4, dtype=np.float32))


# --- SigLIP pair scores ---------------------------------------------------------------------------
def test_pair_probabilities_hand_computed():
    images = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    texts = np.array([[0.6, 0.8], [0.6, 0.8]], np.float32)
    # dots 0.6 and 0.8; t = exp(log 10) = 10, b = -5: sigmoid(1) and sigmoid(3).
    probabilities = scores.pair_probabilities(images, texts, math.log(10.0), -5.0)
    np.testing.assert_allclose(probabilities, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))], rtol=1e-6)


def test_match_probabilities_diagonal_is_pair_probabilities_and_jits():
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    images, texts = unit(rng.normal(size=(4, 6))), unit(rng.normal(size=(4, 6)))
    matrix = jax.jit(scores.match_probabilities)(images, texts, 2.3, -10.0)
    expected = 1 / (1 + np.exp(-(np.exp(2.3) * images.astype(np.float64) @ texts.T - 10.0)))
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.diag(matrix), scores.pair_probabilities(images, texts, 2.3, -10.0), rtol=1e-5)


def test_pair_probabilities_rejects_unpaired_rows():
    with pytest.raises(ValueError, match="Use match_probabilities"):
        scores.pair_probabilities(np.ones((2, 3)), np.ones((3, 3)), 0.0, 0.0)
