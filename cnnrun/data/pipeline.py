"""Batches from in-memory uint8 splits: seeded shuffling, vectorised gathers, no per-sample Python work."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from cnnrun.data import Split
from cnnrun.data.augment import augment_batch


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed run replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_starts(n: int, batch_size: int) -> range:
    """Where each batch of ``n`` samples starts: every ``batch_size``, except that a last batch of ONE sample joins
    the batch before it (that one holds batch_size + 1).

    Batch statistics of one sample are undefined: batchnorm over vectors or 1×1 maps has no variance, and PyTorch
    raises while Chainer, TensorFlow and Keras each did something else. Merging (rather than dropping) keeps every
    image in every epoch, in every framework alike; batch i still starts at i·batch_size, so a resumed run's
    batch index still finds its place. A split of one sample is that one batch.
    """
    stop = n - 1 if n > batch_size and n % batch_size == 1 else n
    return range(0, stop, batch_size)


def num_batches(n: int, batch_size: int) -> int:
    return len(batch_starts(n, batch_size))


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
    Batches are cut by :func:`batch_starts` (a last batch of one sample joins the one before).
    """
    n = len(split)
    starts = batch_starts(n, batch_size)
    for i in range(start_batch, len(starts)):
        start = starts[i]
        stop = starts[i + 1] if i + 1 < len(starts) else n
        if order is None:
            images = split.images[start:stop]
            labels = split.labels[start:stop]
        else:
            idx = order[start:stop]
            images = split.images.take(idx, axis=0)
            labels = split.labels.take(idx)
        if augment is not None and rng is not None:
            images = augment_batch(images, augment, rng)
        yield images, labels
