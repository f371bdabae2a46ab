"""How batches reach the runner: prepared on the host ahead of the step, or gathered where the runner holds the data.

:class:`HostFeed` hands the runner NumPy batches gathered from RAM or the memory-mapped cache (or decoded from
files), augmented, on a background thread a few batches ahead; on a GPU that thread also copies each batch to the
device (``Runner.stage``), so the copy overlaps the step before.
:class:`DeviceFeed` copies every split once into the runner's own arrays on its device (GPU memory on a GPU) and
gathers each batch there by the epoch's order: no per-step copy from the host, which is what a hand-written loop
with the data on the GPU does.

Both give batch i of epoch e the samples ``epoch_order(n, seed, e)[starts[i]:starts[i + 1]]``, so the two feeds
train on the same batches in the same order, and a run resumed mid-epoch on either sees what the uninterrupted
run saw. :func:`choose_feed` applies ``dataset.on_device``.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Protocol, Tuple

import numpy as np

from cnnrun.data import Dataset, Split
from cnnrun.data.pipeline import batch_bounds, epoch_order, iterate_batches, prefetched, training_batches
from cnnrun.errors import UserError

# dataset.on_device=auto holds a dataset on a GPU when its images take at most this share of the device's free
# memory: the rest is the model's, the optimizer's and the activations' (several GB for a large batch).
AUTO_SHARE = 0.25


class Feed(Protocol):
    where: str  # said in the run's first line and its tags: "host" or "device"

    def training(self, split: Split, batch_size: int, seed: int, epoch: int, augment, start_batch: int
                 ) -> Iterator[Tuple[object, object, object]]:
        """(images, labels, mix) of ``epoch``'s batches from ``start_batch`` on, in the runner's terms."""

    def inference(self, split: Split, batch_size: int) -> Iterator[Tuple[object, np.ndarray]]:
        """(images, NumPy labels) of ``split`` in stored order, for evaluation."""


class HostFeed:
    """NumPy batches prepared on a background thread (:mod:`cnnrun.data.pipeline`), each also passed through
    ``stage`` there (``Runner.stage``: on a GPU, copied to it while the step before runs)."""

    where = "host"

    def __init__(self, stage: Optional[Callable] = None):
        self.stage = stage

    def training(self, split, batch_size, seed, epoch, augment=None, start_batch=0):
        batches = training_batches(split, batch_size, seed, epoch, augment, start_batch)
        if self.stage is not None:
            batches = ((self.stage(x), self.stage(y), mix) for x, y, mix in batches)
        return prefetched(batches)

    def inference(self, split, batch_size):
        batches = iterate_batches(split, batch_size)
        if self.stage is not None:  # the labels stay NumPy: the metrics are computed on the host
            batches = ((self.stage(x), y) for x, y in batches)
        return prefetched(batches)


HOST = HostFeed()


class DeviceFeed:
    """Every split held once by the runner on its device (``runner.hold``), batches gathered there
    (``runner.gather``). Augmentations run on host batches, so this feed has none (the config refuses both)."""

    where = "device"

    def __init__(self, runner, dataset: Dataset):
        self.runner = runner
        # Held up front: a dataset that does not fit fails before the first step, not at the test split.
        self._held: Dict[int, Tuple[object, object]] = {
            id(split): (runner.hold(split.images), runner.hold(split.labels))
            for split in (dataset.train, dataset.val, dataset.test)
        }

    def _images_and_labels(self, split: Split) -> Tuple[object, object]:
        held = self._held.get(id(split))
        if held is None:
            raise ValueError("DeviceFeed serves the splits of the dataset it was made with")
        return held

    def training(self, split, batch_size, seed, epoch, augment=None, start_batch=0):
        if augment is not None and augment.any:
            raise ValueError("DeviceFeed has no augmentations (they run on host batches)")
        images, labels = self._images_and_labels(split)
        order = self.runner.hold(epoch_order(len(split), seed, epoch))  # one small copy per epoch
        for start, stop in batch_bounds(len(split), batch_size, start_batch):
            index = order[start:stop]
            yield self.runner.gather(images, index), self.runner.gather(labels, index), None

    def inference(self, split, batch_size):
        images, _ = self._images_and_labels(split)
        for start, stop in batch_bounds(len(split), batch_size):
            yield images[start:stop], split.labels[start:stop]


def images_bytes(dataset: Dataset) -> int:
    return sum(split.images.nbytes for split in (dataset.train, dataset.val, dataset.test))


def choose_feed(dataset_cfg, runner, dataset: Dataset) -> "Feed":
    """The feed ``dataset.on_device`` asks for on ``runner``'s device.

    ``false``: host batches. ``true``: held on the device (GPU memory on a GPU, the framework's arrays in RAM on a
    CPU); a dataset larger than the GPU's free memory is refused. ``auto``: held on a GPU when the images take at
    most AUTO_SHARE of its free memory; host batches on a CPU (the OS page cache already keeps a dataset that fits
    in RAM, and the host feed prepares batches on a second thread) and wherever the framework cannot say how much
    memory is free. The config already refused ``true`` with augmentations or with ``dataset.cache=false``, and
    ``auto`` with either is the host feed.
    """
    host = HostFeed(runner.stage)
    choice = dataset_cfg.on_device
    if choice is False or dataset_cfg.augment.any or not dataset_cfg.cache:
        return host
    free: Optional[int] = runner.device_memory()
    size = images_bytes(dataset)
    if choice == "auto":
        return DeviceFeed(runner, dataset) if free is not None and size <= AUTO_SHARE * free else host
    if free is not None and size > free:
        raise UserError(
            f"dataset.on_device=true: the images of {dataset.name} take {size / 2**30:.2f} GiB but "
            f"{runner.device_name} has {free / 2**30:.2f} GiB free; set dataset.on_device=auto (held on the device "
            "only when they fit) or false"
        )
    return DeviceFeed(runner, dataset)
