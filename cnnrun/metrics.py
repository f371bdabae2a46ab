"""Loss, accuracy and confusion from logits, computed once in NumPy for every framework alike."""

from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Sum over the batch of -log softmax(logits)[label], in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).sum())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarise(batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) over (logits, labels) batches."""
    loss, correct, count, predictions = 0.0, 0, 0, []
    for logits, labels in batches:
        loss += cross_entropy_sum(logits, labels)
        pred = logits.argmax(axis=1)
        correct += int((pred == labels).sum())
        count += len(labels)
        predictions.append(pred)
    preds = np.concatenate(predictions) if predictions else np.zeros(0, np.int64)
    return (loss / count, correct / count, preds) if count else (float("nan"), float("nan"), preds)
