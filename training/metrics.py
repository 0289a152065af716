"""Classification metrics: accuracy, macro-F1, per class, confusion; calibration of the probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are the truth, columns the prediction."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def classification_metrics(
    labels: np.ndarray, predictions: np.ndarray, classes: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix, as plain types."""
    matrix = confusion_matrix(labels, predictions, len(classes))
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    total = int(matrix.sum())
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "num_images": total,
    }


def mean_cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean -log of the probability given to the true class; a probability of 0 counts as 1e-12."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """How far the top probability is from being right that often: 0 is perfectly calibrated.

    Images are grouped by their top probability into `bins` equal-width bins over (0, 1]; the error
    is the mean over bins of |accuracy - mean top probability|, each bin weighted by its share of
    the images (Guo et al. 2017, "On Calibration of Modern Neural Networks").
    """
    if len(labels) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 cannot occur
    # for a top probability of a softmax, which is at least 1/num_classes.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    right = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    confident = np.bincount(index, weights=confidence.astype(np.float64), minlength=bins)
    gap = np.abs(right - confident)  # per bin: its image count * |accuracy - mean confidence|
    return float(gap.sum() / len(labels))
