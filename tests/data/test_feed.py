"""dataset.on_device: a held dataset gives the same batches in the same order as host batches, a held run resumed
mid-epoch sees the uninterrupted run's batches, and the choice between the feeds follows the stated rule."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pydantic import ValidationError

from cnnrun.config import AugmentConfig, DatasetConfig, TrainerConfig
from cnnrun.data import Dataset, Split
from cnnrun.data.feed import AUTO_SHARE, HOST, DeviceFeed, HostFeed, choose_feed, images_bytes
from cnnrun.errors import TrainingInterrupted, UserError
from cnnrun.progress import ProgressView
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Trainer, TrainState
from tests.numpy_runner import SignalAt, SoftmaxRegression, quadrant_dataset


def _batches(feed, split, epoch: int, start_batch: int = 0, batch_size: int = 8):
    return [(np.asarray(x).copy(), np.asarray(y).copy(), mix)
            for x, y, mix in feed.training(split, batch_size, 3, epoch, None, start_batch)]


@pytest.mark.parametrize("epoch, start_batch, batch_size", [(0, 0, 8), (1, 0, 8), (1, 5, 8), (2, 0, 59)])
def test_held_batches_are_the_host_batches_in_the_same_order(epoch, start_batch, batch_size):
    dataset = quadrant_dataset()
    held = DeviceFeed(SoftmaxRegression(16, 4), dataset)
    got = _batches(held, dataset.train, epoch, start_batch, batch_size)
    expected = _batches(HOST, dataset.train, epoch, start_batch, batch_size)
    assert len(got) == len(expected) > 0
    for (a, la, ma), (b, lb, mb) in zip(got, expected):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        assert ma is mb is None
    if batch_size == 59:  # 60 images: the last batch of one joins the one before, in both feeds
        assert [len(y) for _, y, _ in got] == [60]


@pytest.mark.parametrize("batch_size, sizes", [(6, [6, 6, 6, 2]), (19, [20])])  # 19: a last batch of one joins
def test_held_evaluation_batches_are_the_stored_order(batch_size, sizes):
    dataset = quadrant_dataset()
    held = list(DeviceFeed(SoftmaxRegression(16, 4), dataset).inference(dataset.test, batch_size))
    host = list(HOST.inference(dataset.test, batch_size))
    assert [len(y) for _, y in held] == [len(y) for _, y in host] == sizes
    for (a, la), (b, lb) in zip(held, host):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_a_held_feed_refuses_splits_and_augmentations_it_cannot_serve():
    dataset = quadrant_dataset()
    feed = DeviceFeed(SoftmaxRegression(16, 4), dataset)
    with pytest.raises(ValueError, match="splits of the dataset it was made with"):
        list(feed.inference(quadrant_dataset().test, 4))
    with pytest.raises(ValueError, match="no augmentations"):
        list(feed.training(dataset.train, 8, 0, 0, AugmentConfig(horizontal_flip=True)))


_DATASET = quadrant_dataset()  # one object: a DeviceFeed serves the splits it was made with


def _fit(runner, feed, state=None, epochs: int = 2):
    cfg = TrainerConfig(epochs=epochs, patience=None, batch_size=8, eval_batch_size=16, log_every=3, progress=False)
    saved = []
    trainer = Trainer(runner, _DATASET, cfg, NullLogger(), ProgressView(False, epochs),
                      lambda kind, s: saved.append(TrainState.from_dict(s.to_dict())), feed=feed)
    try:
        trainer.fit(state)
    except TrainingInterrupted:
        pass
    return saved


def test_training_on_a_held_dataset_is_training_on_host_batches():
    on_host, held = SoftmaxRegression(16, 4), SoftmaxRegression(16, 4)
    host_history = _fit(on_host, HOST)[-1].history
    held_history = _fit(held, DeviceFeed(held, _DATASET))[-1].history
    assert held.steps == on_host.steps == 16
    for a, b in zip(held.labels_seen, on_host.labels_seen):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(held.kernel, on_host.kernel)  # same batches, same arithmetic: bit for bit
    metrics = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[row[k] for k in metrics] for row in held_history] == [[row[k] for k in metrics] for row in host_history]


class HoldingRecorder(SoftmaxRegression):
    """The NumPy runner, noting whether each batch it evaluates is read from an array it holds."""

    def __init__(self):
        super().__init__(16, 4)
        self.held, self.evaluated_held = [], []

    def hold(self, array):
        held = super().hold(array)
        self.held.append(held)
        return held

    def predict_logits(self, images):
        self.evaluated_held.append(any(np.shares_memory(images, held) for held in self.held))
        return super().predict_logits(images)


def test_a_held_run_validates_on_the_held_images_not_the_host_ones():
    runner = HoldingRecorder()
    _fit(runner, DeviceFeed(runner, _DATASET))
    assert len(runner.evaluated_held) == 4 and all(runner.evaluated_held)  # 2 epochs × 2 validation batches


def test_a_held_run_resumed_mid_epoch_sees_the_batches_of_the_uninterrupted_run():
    straight = SoftmaxRegression(16, 4)
    _fit(straight, DeviceFeed(straight, _DATASET))
    broken = SignalAt(16, 4, at=11)  # epoch 2, batch 3 of 8
    saved = _fit(broken, DeviceFeed(broken, _DATASET))
    state = saved[-1]
    assert (state.epoch, state.batch) == (1, 3)
    _fit(broken, DeviceFeed(broken, _DATASET), state)
    assert broken.steps == straight.steps == 16
    for a, b in zip(broken.labels_seen, straight.labels_seen):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(broken.kernel, straight.kernel)


class WithDeviceMemory(SoftmaxRegression):
    """The NumPy runner reporting ``free`` bytes of device memory, as a GPU runner does."""

    device_name = "cuda:0 (a GPU)"

    def __init__(self, free: int):
        super().__init__(16, 4)
        self.free = free

    def device_memory(self):
        return self.free


def _host_feed_of(feed, runner) -> bool:
    """Whether ``feed`` is host batches staged by ``runner`` (copied to its GPU on the prefetch thread)."""
    return isinstance(feed, HostFeed) and feed.stage == runner.stage


def _dataset_cfg(**settings):
    return DatasetConfig(name="mnist_5k", num_classes=4, channels=1, image_size=4, **settings)


def test_on_device_false_and_auto_on_a_cpu_keep_host_batches():
    dataset = quadrant_dataset()
    gpu, cpu = WithDeviceMemory(10**12), SoftmaxRegression(16, 4)
    assert _host_feed_of(choose_feed(_dataset_cfg(on_device=False), gpu, dataset), gpu)
    assert _host_feed_of(choose_feed(_dataset_cfg(), cpu, dataset), cpu)  # auto; a CPU reports None


def test_auto_holds_a_dataset_that_takes_at_most_a_quarter_of_the_free_device_memory():
    dataset = quadrant_dataset()
    size = images_bytes(dataset)
    roomy = WithDeviceMemory(int(size / AUTO_SHARE))
    assert isinstance(choose_feed(_dataset_cfg(), roomy, dataset), DeviceFeed)
    tight = WithDeviceMemory(int(size / AUTO_SHARE) - 1)
    assert _host_feed_of(choose_feed(_dataset_cfg(), tight, dataset), tight)
    augmented = _dataset_cfg(augment=AugmentConfig(random_crop_padding=1))
    assert _host_feed_of(choose_feed(augmented, roomy, dataset), roomy)


def test_on_device_true_holds_on_a_cpu_and_refuses_a_dataset_larger_than_the_free_device_memory():
    dataset = quadrant_dataset()
    size = images_bytes(dataset)
    assert isinstance(choose_feed(_dataset_cfg(on_device=True), SoftmaxRegression(16, 4), dataset), DeviceFeed)
    assert isinstance(choose_feed(_dataset_cfg(on_device=True), WithDeviceMemory(size), dataset), DeviceFeed)
    with pytest.raises(UserError) as err:
        choose_feed(_dataset_cfg(on_device=True), WithDeviceMemory(size - 1), dataset)
    message = str(err.value)
    assert "dataset.on_device=true" in message and "cuda:0 (a GPU) has" in message and "GiB free" in message


def test_the_refusal_says_how_large_the_images_are_and_how_much_memory_is_free():
    gib = 2**30
    images = np.broadcast_to(np.zeros((1, 1, 1, 1), np.uint8), (1536, 1024, 1024, 1))  # 1.5 GiB counted, none used
    empty = Split(np.zeros((0, 1024, 1024, 1), np.uint8), np.zeros(0, np.int64))
    dataset = Dataset("huge", Split(images, np.zeros(1536, np.int64)), empty, empty, ("a",), "here", (0.0,), (1.0,))
    assert images_bytes(dataset) == 1.5 * gib
    with pytest.raises(UserError) as err:
        choose_feed(_dataset_cfg(on_device=True), WithDeviceMemory(gib), dataset)
    assert str(err.value) == ("dataset.on_device=true: the images of huge take 1.50 GiB but cuda:0 (a GPU) has 1.00 "
                              "GiB free; set dataset.on_device=auto (held on the device only when they fit) or false")


@pytest.mark.parametrize("settings, says", [
    (dict(augment=AugmentConfig(horizontal_flip=True)), "dataset.augment runs on host batches"),
    (dict(name="folder", root="/nonexistent", cache=False), "dataset.cache=false decodes"),
])
def test_the_config_refuses_a_held_dataset_with_host_only_work(settings, says):
    base = dict(name="mnist_5k", num_classes=4, channels=1, image_size=4)
    with pytest.raises(ValidationError, match=says):
        DatasetConfig(**{**base, **settings, "on_device": True})
    DatasetConfig(**{**base, **settings, "on_device": "auto"})  # auto: host batches, accepted


class Staging(SoftmaxRegression):
    """The NumPy runner staging each host batch as a GPU runner does (a copy), noting the thread it ran on."""

    def __init__(self):
        super().__init__(16, 4)
        self.staged_on = []

    def stage(self, array):
        self.staged_on.append(threading.current_thread().name)
        return array.copy()


def test_host_batches_are_staged_on_the_prefetch_thread_in_order_and_labels_stay_numpy_for_metrics():
    staged, plain = Staging(), SoftmaxRegression(16, 4)
    feed = choose_feed(_dataset_cfg(on_device=False), staged, _DATASET)
    saved = _fit(staged, feed)
    _fit(plain, HOST)
    # 8 training batches (images and labels) and 2 validation batches (images only) in each of 2 epochs
    assert staged.staged_on == ["cnnrun-prefetch"] * (2 * (8 * 2 + 2))
    for a, b in zip(staged.labels_seen, plain.labels_seen):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(staged.kernel, plain.kernel)
    assert saved[-1].history[-1]["val_acc"] == _fit(SoftmaxRegression(16, 4), HOST)[-1].history[-1]["val_acc"]
