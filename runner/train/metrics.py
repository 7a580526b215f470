"""Classification scores of a model's predictions (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def classification_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1 and the confusion matrix.

    The macro averages run over the classes that occur in the truth or the predictions
    (scikit-learn's rule); a class with no predicted (or no true) sample scores 0 there.
    """
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    total = int(matrix.sum())
    hits = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    present = (predicted + actual) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        recall = np.where(actual > 0, hits / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1_score": float(f1[present].mean()) if present.any() else 0.0,
        "confusion_matrix": matrix.tolist(),
    }


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class."""
    return [int(c) for c in np.bincount(np.asarray(labels, np.int64), minlength=num_classes)[:num_classes]]


def baseline_accuracy(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> float:
    """Accuracy on the test labels of always predicting the training majority class."""
    majority = int(np.argmax(class_counts(train_labels, num_classes)))
    return float(np.mean(np.asarray(test_labels) == majority)) if len(test_labels) else 0.0
