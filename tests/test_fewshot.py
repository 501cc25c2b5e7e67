"""The few-shot linear probe (ridge regression, as big_vision's fewshot_lsr) against a numpy reference."""
import os

import numpy as np
import pytest

from siglip_jax.config import default_config, eval_config, source_config, validate
from siglip_jax.data.sources import ImageFolderSource
from siglip_jax.evaluation import fewshot, runner

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10", "test")


def _reference_predictions(train_x, train_y, test_x, num_classes, l2_reg):
    """Ridge as an augmented least-squares problem [x; sqrt(l2) I] w = [y; 0], solved by lstsq."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    def design(features):
        return np.hstack([(features - mean) / std, np.full((len(features), 1), 100.0)])
    x = design(train_x)
    y = np.where(np.arange(num_classes)[None, :] == train_y[:, None], 1.0, -1.0)
    stacked_x = np.vstack([x, np.sqrt(l2_reg) * np.eye(x.shape[1])])
    stacked_y = np.vstack([y, np.zeros((x.shape[1], num_classes))])
    weights = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0]
    return np.argmax(design(test_x) @ weights, axis=1), weights


@pytest.mark.parametrize("count,dim", [(60, 8), (12, 40)])  # primal (n >= d) and dual (d > n) forms
def test_ridge_matches_least_squares_reference(count, dim):
    rng = np.random.default_rng(count)
    train_x, train_y = rng.normal(size=(count, dim)), np.arange(count) % 3
    test_x = rng.normal(size=(50, dim))
    expected, weights = _reference_predictions(train_x, train_y, test_x, 3, 2.0)
    probe = fewshot.fit_ridge(train_x, train_y, 3, 2.0)
    np.testing.assert_allclose(probe["weights"], weights, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(fewshot.predict(probe, test_x), expected)


def test_separable_classes_are_probed_perfectly_and_labels_matter():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    train_y, test_y = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 25)
    train_x, test_x = centres[train_y] + rng.normal(size=(20, 16)), centres[test_y] + rng.normal(size=(100, 16))
    assert fewshot.fewshot_accuracy(train_x, train_y, test_x, test_y, 4, l2_reg=1.0) == 1.0
    assert fewshot.fewshot_accuracy(train_x, train_y, test_x, (test_y + 1) % 4, 4, l2_reg=1.0) == 0.0


def test_a_class_with_fewer_images_than_shots_is_named():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 5)
    with pytest.raises(ValueError, match=r"fewer than 3 images in a class: 'cat' has 2"):
        fewshot.select_shots(labels, 3, ["dog", "cat", "bird"])
    chosen = fewshot.select_shots(labels, 2, ["dog", "cat", "bird"], seed=1)
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 2]


class _PixelEmbedder:
    """Frozen 'embeddings' from the pixels: mean colour of each 4x4 cell of the image."""

    def images(self, params, images):
        images = np.asarray(images, np.float32)
        n, size = len(images), images.shape[1]
        cells = images.reshape(n, 4, size // 4, 4, size // 4, 3).mean(axis=(2, 4))
        return cells.reshape(n, -1)


@pytest.mark.skipif(not os.path.isdir(CIFAR), reason="../shared/data/cifar10 is absent (real-data test)")
def test_fewshot_eval_on_cifar10_matches_the_reference_and_beats_chance():
    config = default_config()
    config.model.image.image_size = 16
    config.evals.probe = eval_config("fewshot", source_config("image_folder", path=CIFAR, max_per_class=60),
                                     shots=20, l2_reg=16.0)
    validate(config)
    evaluator = runner.build_evaluators(config, None, lambda s: ImageFolderSource(**s.args.to_dict()))["probe"]
    result = evaluator.evaluate(_PixelEmbedder(), None)
    assert result["num_images"] == 400  # the 40 images per class not drawn as shots
    embedder = _PixelEmbedder()
    expected, _ = _reference_predictions(
        embedder.images(None, evaluator.train_images).astype(np.float64), evaluator.train_labels,
        embedder.images(None, evaluator.test_images).astype(np.float64), 10, 16.0)
    assert result["20shot_accuracy"] == pytest.approx(np.mean(expected == evaluator.test_labels))
    assert result["20shot_accuracy"] > 0.15  # colour layout alone beats CIFAR-10's 10% chance
    config.evals.probe.shots = 61
    with pytest.raises(ValueError, match="fewer than 61 images in a class: 'airplane' has 60"):
        runner.build_evaluators(config, None, lambda s: ImageFolderSource(**s.args.to_dict()))


def test_fewshot_with_a_separate_test_split_validates():
    config = default_config()
    config.evals.probe = eval_config("fewshot", source_config("image_folder", path="train"),
                                     test_source=source_config("image_folder", path="test"), shots=5)
    validate(config)
