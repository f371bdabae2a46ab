"""The two pictures every run gets: learning curves and the test confusion matrix (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: List[Dict], path: Path, title: str) -> Path:
    plt = _pyplot()
    epochs = [row["epoch"] + 1 for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    validated = all(row["val_loss"] is not None for row in history)  # no validation split: train curves only
    for ax, kind in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, label in (("train", "train"), ("val", "validation")):
            if split == "train" or validated:
                ax.plot(epochs, [row[f"{split}_{kind}"] for row in history], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix_plot(counts: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    n = len(class_names)
    size = max(5.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center",
                        color="white" if counts[i, j] > threshold else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
