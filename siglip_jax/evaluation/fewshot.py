"""Few-shot linear probe, as big_vision's `fewshot_lsr`: closed-form ridge regression from frozen image
embeddings to +-1 one-hot targets, N images per class from a train split, accuracy on a test split.

Features are whitened with the train shots' mean and standard deviation, and a large constant feature is
appended so its weight acts as a bias that the L2 penalty barely touches.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BIAS_FEATURE = 100.0
DEFAULT_L2_REG = 2.0 ** 10  # big_vision's default regulariser for fewshot_lsr


def select_shots(labels: np.ndarray, shots: int, class_names: Sequence[str], seed: int = 0) -> np.ndarray:
    """Sorted indices of `shots` examples per class, drawn at random from `labels` [n] (seeded).

    Raises ValueError naming every class with fewer than `shots` examples.
    """
    if shots < 1:
        raise ValueError(f"Few-shot evals need shots >= 1 images per class, got {shots}.")
    rng = np.random.default_rng(seed)
    chosen, short = [], []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(np.asarray(labels) == label)
        if len(members) < shots:
            short.append(f"{name!r} has {len(members)}")
        else:
            chosen.append(rng.choice(members, shots, replace=False))
    if short:
        raise ValueError(
            f"The few-shot train split has fewer than {shots} images in a class: {'; '.join(short)}. Use fewer "
            "shots (the eval's shots option) or add images to those class folders."
        )
    return np.sort(np.concatenate(chosen))


def _whitened_with_bias(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    whitened = (np.asarray(features, np.float64) - mean) / std
    return np.concatenate([whitened, np.full((len(whitened), 1), BIAS_FEATURE)], axis=1)


def fit_ridge(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float) -> dict[str, np.ndarray]:
    """Ridge weights from train features [n, d] and integer labels [n]: {"weights" [d + 1, classes],
    "mean" [d], "std" [d]}. Solves in the primal (d x d) or dual (n x n) form, whichever is smaller."""
    features = np.asarray(features, np.float64)
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-5
    x = _whitened_with_bias(features, mean, std)
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    count, dim = x.shape
    if count >= dim:
        weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(dim), x.T @ targets)
    else:
        weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(count), targets)
    return {"weights": weights, "mean": mean, "std": std}


def predict(probe: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Predicted labels [n] of features [n, d] under a probe from fit_ridge."""
    return np.argmax(_whitened_with_bias(features, probe["mean"], probe["std"]) @ probe["weights"], axis=1)


def fewshot_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, num_classes: int, l2_reg: float = DEFAULT_L2_REG) -> float:
    """Top-1 accuracy on the test features of a ridge probe fitted on the train features."""
    probe = fit_ridge(train_features, train_labels, num_classes, l2_reg)
    return float(np.mean(predict(probe, test_features) == np.asarray(test_labels)))
