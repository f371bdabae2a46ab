"""Batches from uint8 splits: seeded shuffling, vectorised gathers, no per-sample Python work, prepared ahead.

:func:`training_batches` is every training batch of an epoch, gathered and augmented, a function of (seed,
epoch, batch) only; :func:`prefetched` runs such an iterator on a background thread a few batches ahead of the
consumer, in the same order, so reading from the memory map, decoding files and augmenting overlap the
training step (NumPy, Pillow and the frameworks' kernels release the GIL).
"""

from __future__ import annotations

import threading
from queue import Empty, Full, Queue
from typing import Iterable, Iterator, Optional, Tuple, TypeVar

import numpy as np

from cnnrun.data import Split
from cnnrun.data.augment import Mix, augment_batch, mix_batch, mixes

PREFETCH_DEPTH = 3  # batches prepared ahead of the one in use: enough to absorb a slow batch, few MB each
_POLL_S = 0.1  # how often a blocked producer checks whether the consumer has gone

T = TypeVar("T")


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


def batch_bounds(n: int, batch_size: int, start_batch: int = 0) -> Iterator[Tuple[int, int]]:
    """(start, stop) of each batch of ``n`` samples (cut by :func:`batch_starts`), from batch ``start_batch`` on."""
    starts = batch_starts(n, batch_size)
    for i in range(start_batch, len(starts)):
        yield starts[i], starts[i + 1] if i + 1 < len(starts) else n


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
    for start, stop in batch_bounds(len(split), batch_size, start_batch):
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


def training_batches(
    split: Split, batch_size: int, seed: int, epoch: int, augment=None, start_batch: int = 0
) -> Iterator[Tuple[np.ndarray, np.ndarray, Optional[Mix]]]:
    """(images, labels, mix) for the batches of ``epoch`` from ``start_batch`` on: shuffled by (seed, epoch),
    augmented with a generator seeded by (seed, epoch, batch), so a run resumed mid-epoch sees exactly the
    batches the uninterrupted run saw. ``mix`` is None unless mixup/cutmix is on."""
    order = epoch_order(len(split), seed, epoch)
    use_augment = augment is not None and augment.any
    use_mix = use_augment and mixes(augment)
    batches = iterate_batches(split, batch_size, order, start_batch=start_batch)
    for batch, (images, labels) in enumerate(batches, start=start_batch):
        mix = None
        if use_augment:
            rng = np.random.default_rng([seed, epoch, batch, 1])
            images = augment_batch(images, augment, rng)
            if use_mix:
                images, mix = mix_batch(images, labels, augment, rng)
        yield images, labels, mix


def prefetched(items: Iterable[T], depth: int = PREFETCH_DEPTH) -> Iterator[T]:
    """``items``, produced on a background thread up to ``depth`` ahead, yielded in their order.

    An exception in the producer is raised here, at the item it replaced (a corrupt file stops training with
    its own message, never a hang). Closing this generator (or dropping it) stops the producer after at most
    the item it is preparing.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=_POLL_S)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            put((False, err))

    producer = threading.Thread(target=produce, name="cnnrun-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            try:
                is_item, value = queue.get(timeout=_POLL_S)
            except Empty:
                if not producer.is_alive() and queue.empty():
                    raise RuntimeError("the batch producer stopped without a result") from None
                continue
            if not is_item:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        producer.join()
