"""The Runner protocol over global batches: each rank trains and predicts on its shard, and answers for all ranks."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

from cnnrun.backends import mean_metrics
from cnnrun.distributed.shard import shard_bounds, shard_sizes


class ShardedRunner:
    """Wraps a framework's runner (already made data-parallel by its engine's ``wrap``) for one rank.

    ``train_step`` takes the global batch and trains on this rank's rows; ``train_metrics`` are the global batch's
    (sums over ranks); ``predict_logits`` returns the logits of the whole batch (each rank predicts its rows, then
    all rows are gathered), so whatever the trainer computes from them is one process's result on every rank.
    Everything else (weights, training state, the device name) is the wrapped runner's.
    """

    def __init__(self, runner, collective, parallel, num_classes: int):
        self.runner = runner
        self.num_classes = num_classes
        self.collective = collective
        self.parallel = parallel
        self.world = collective.world
        self._state_shared = True  # whether every rank holds rank 0's non-trained state (see Parallel.share_state)

    def __getattr__(self, name):  # get_weights, set_learning_rate, device_name, …: the wrapped runner's
        return getattr(self.runner, name)

    def stage(self, array):
        """The global batch stays on the host: each rank copies only its own rows, in its step."""
        return array

    def _rows(self, n: int) -> Tuple[int, int]:
        return shard_bounds(n, self.world.rank, self.world.size)

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        start, stop = self._rows(len(labels))
        if mix is not None:
            mix = dataclasses.replace(mix, partner_labels=mix.partner_labels[start:stop])
        self.parallel.set_shard(stop - start, len(labels))
        self._state_shared = False
        self.runner.train_step(images[start:stop], labels[start:stop], mix)

    def train_metrics(self) -> Tuple[float, float, int]:
        loss, acc, count = self.runner.train_metrics()
        local = np.array([loss * count, acc * count, count], np.float64) if count else np.zeros(3)
        loss_sum, correct, total = self.collective.all_sum(local)
        return mean_metrics(float(loss_sum), int(round(correct)), int(round(total)))

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        if not self._state_shared:
            self.parallel.share_state()
            self._state_shared = True
        start, stop = self._rows(len(images))
        if stop > start:
            local = self.runner.predict_logits(images[start:stop])
        else:  # fewer rows than ranks: nothing to predict here, but this rank's (empty) part is still gathered
            local = np.zeros((0, self.num_classes), np.float32)
        return self.collective.all_gather(local, shard_sizes(len(images), self.world.size))
