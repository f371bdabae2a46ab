"""Batches from in-memory uint8 splits: seeded shuffling, vectorised gathers, no per-sample Python work."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from cnnrun.data import Split
from cnnrun.data.augment import augment_batch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed run replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def iterate_batches(
    split: Split,
    batch_size: int,
    order: Optional[np.ndarray] = None,
    augment=None,
    rng: Optional[np.random.Generator] = None,
    start_batch: int = 0,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield (images, labels) batches in ``order`` (or stored order), starting at batch ``start_batch``.

    ``augment`` is an AugmentConfig; augmentation needs ``rng`` and is applied per batch, vectorised.
    """
    n = len(split)
    for start in range(start_batch * batch_size, n, batch_size):
        if order is None:
            images = split.images[start : start + batch_size]
            labels = split.labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            images = split.images.take(idx, axis=0)
            labels = split.labels.take(idx)
        if augment is not None and rng is not None:
            images = augment_batch(images, augment, rng)
        yield images, labels
