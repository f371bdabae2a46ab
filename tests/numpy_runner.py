"""A runner without a framework, for testing the training loop's bookkeeping exactly and in milliseconds.

It is a real :class:`cnnrun.backends.Runner`: multinomial logistic regression on the raw pixels, trained by plain
SGD in float64 NumPy, so it learns, and two runs with the same inputs agree to the bit. It also records what the
loop asked of it (the step count at each sync, each step's loss), which is what the trainer tests check against.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from cnnrun.backends import mean_metrics
from cnnrun.data import Dataset, Split
from cnnrun.metrics import cross_entropy_sum


class SoftmaxRegression:
    device_name = "cpu (NumPy)"

    def __init__(self, features: int, classes: int, lr: float = 0.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kernel = rng.normal(0.0, 0.01, (classes, features))  # canonical (out, in)
        self.bias = np.zeros(classes)
        self.lr = lr
        self.steps = 0
        self.syncs: List[int] = []  # self.steps at each train_metrics call
        self.step_sums: List[Tuple[float, int, int]] = []  # (loss sum, correct, images) of every step
        self.labels_seen: List[np.ndarray] = []  # every step's labels, in the order they came
        self.rates_set: List[Tuple[int, float]] = []  # (steps done, rate) at each set_learning_rate
        self.mixes: List[float] = []  # λ of every mixed step
        self._loss_sum, self._correct, self._count = 0.0, 0, 0

    def hold(self, array) -> np.ndarray:
        return np.array(array)  # this runner's device is the process's memory: a copy, as a GPU runner's would be

    def gather(self, held: np.ndarray, index: np.ndarray) -> np.ndarray:
        return held.take(index, axis=0)

    def device_memory(self):
        return None

    def stage(self, array: np.ndarray) -> np.ndarray:
        return array

    def _logits(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1) / 255.0 @ self.kernel.T + self.bias

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        """With ``mix`` (mixup/cutmix): loss λ·CE(labels) + (1 − λ)·CE(partner labels), accuracy against labels."""
        x = images.reshape(len(images), -1) / 255.0
        logits = x @ self.kernel.T + self.bias
        target = np.eye(self.bias.size)[labels]
        loss = cross_entropy_sum(logits, labels)
        if mix is not None:
            target = mix.lam * target + (1.0 - mix.lam) * np.eye(self.bias.size)[mix.partner_labels]
            loss = mix.lam * loss + (1.0 - mix.lam) * cross_entropy_sum(logits, mix.partner_labels)
            self.mixes.append(mix.lam)
        correct = int((logits.argmax(axis=1) == labels).sum())
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = p / p.sum(axis=1, keepdims=True) - target
        self.kernel -= self.lr * p.T @ x / len(labels)
        self.bias -= self.lr * p.sum(axis=0) / len(labels)
        self.steps += 1
        self.labels_seen.append(labels.copy())
        self.step_sums.append((loss, correct, len(labels)))
        self._loss_sum, self._correct, self._count = self._loss_sum + loss, self._correct + correct, self._count + len(labels)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = lr
        self.rates_set.append((self.steps, lr))

    def train_metrics(self) -> Tuple[float, float, int]:
        self.syncs.append(self.steps)
        metrics = mean_metrics(self._loss_sum, self._correct, self._count)
        self._loss_sum, self._correct, self._count = 0.0, 0, 0
        return metrics

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        return self._logits(images).astype(np.float32)

    def get_weights(self) -> Dict[str, np.ndarray]:
        return {"dense_0/kernel": self.kernel.copy(), "dense_0/bias": self.bias.copy()}

    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        self.kernel, self.bias = weights["dense_0/kernel"].copy(), weights["dense_0/bias"].copy()

    def get_training_state(self) -> Dict[str, np.ndarray]:
        return {"steps": np.array([self.steps])}

    def set_training_state(self, state: Dict[str, np.ndarray]) -> None:
        self.steps = int(state["steps"][0])


class SignalAt(SoftmaxRegression):
    """Sends this process SIGINT during its ``at``-th step (counted from 1), as a user's Ctrl-C would; each step
    takes at least ``seconds``, for tests of the time accounting."""

    def __init__(self, *args, at: Optional[int] = None, seconds: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.seconds = at, seconds

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        time.sleep(self.seconds)
        super().train_step(images, labels, mix)
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def quadrants(n: int, seed: int, shift: int = 0) -> Split:
    """4×4 grey images whose class (0-3) is the quadrant that is bright; ``shift`` relabels class c as c + shift."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 4, 4, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * (c // 2) : 2 * (c // 2) + 2, 2 * (c % 2) : 2 * (c % 2) + 2, 0] += 180
    return Split(images, (labels + shift) % 4)


def quadrant_dataset(val_shift: int = 0) -> Dataset:
    """60 training images (8 batches of 8, the last one 4), 20 validation and 20 test images.

    With ``val_shift`` the validation labels are wrong in a fixed way, so validation loss rises as the model learns.
    """
    return Dataset("quadrants", quadrants(60, 0), quadrants(20, 1, val_shift), quadrants(20, 2),
                   ("top-left", "top-right", "bottom-left", "bottom-right"), "tests/numpy_runner.py")
