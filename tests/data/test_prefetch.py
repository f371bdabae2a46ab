"""Batches prepared ahead and read from memory maps: the same batches in the same order as reading them inline,
resumed runs that see exactly the uninterrupted run's batches, flat memory, and errors (a corrupt image) that stop
the loader with the file's name instead of hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cnnrun.config import AugmentConfig, TrainerConfig
from cnnrun.data import Dataset, Split, load_dataset
from cnnrun.data.pipeline import _POLL_S, iterate_batches, prefetched, training_batches
from cnnrun.data.rows import Rows
from cnnrun.errors import TrainingInterrupted, UserError
from cnnrun.progress import ProgressView
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Trainer, TrainState
from tests.numpy_runner import SignalAt, SoftmaxRegression, quadrant_dataset

AUGMENT = AugmentConfig(random_crop_padding=1, horizontal_flip=True, mixup_alpha=0.4)
LOADER_TIMEOUT_S = 30  # far above what these few batches take: reaching it means the loader hung


def _drain(iterator, timeout: float = LOADER_TIMEOUT_S):
    """Everything ``iterator`` yields and the exception it ends with, consumed on a thread; fails on a hang."""
    out = {"items": [], "error": None}

    def consume():
        try:
            for item in iterator:
                out["items"].append(item)
        except BaseException as err:
            out["error"] = err

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the loader hung (no result after {timeout} s)"
    return out["items"], out["error"]


def _uneven():
    """Items whose production takes different times, the early ones longest: a pool would finish them out of order."""
    for i in range(12):
        time.sleep(0.002 * (12 - i) if i % 3 else 0.0)
        yield i


def test_prefetched_items_come_in_their_order():
    items, error = _drain(prefetched(_uneven(), depth=4))
    assert error is None and items == list(range(12))


def test_a_producer_error_arrives_after_the_items_before_it():
    def failing():
        yield from range(3)
        raise UserError("img/7.jpg: broken")

    items, error = _drain(prefetched(failing()))
    assert items == [0, 1, 2] and isinstance(error, UserError) and str(error) == "img/7.jpg: broken"


def test_closing_the_consumer_stops_the_producer():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    before = set(threading.enumerate())
    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert len(produced) <= 3 + 2 + 1  # taken, queued, and the one in hand when it stopped


def _spaced(items, seconds: float):
    """``items``, each after a pause of ``seconds``."""
    for item in items:
        time.sleep(seconds)
        yield item


def test_a_producer_slower_than_the_consumers_poll_is_waited_for():
    items, error = _drain(prefetched(_spaced(range(2), 2.5 * _POLL_S)))
    assert error is None and items == [0, 1]


def test_a_consumer_slower_than_the_producer_gets_every_item_once_the_queue_is_full():
    items, error = _drain(_spaced(prefetched(iter(range(4)), depth=1), 2 * _POLL_S))
    assert error is None and items == [0, 1, 2, 3]


def test_a_stream_left_open_does_not_keep_the_process_from_exiting():
    code = ("import itertools\nfrom cnnrun.data.pipeline import prefetched\n"
            "stream = prefetched(itertools.count())\nnext(stream)\n")  # still open (a global) at exit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules this process uses
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=LOADER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]


def _mapped(split: Split, tmp_path, name: str) -> Split:
    path = tmp_path / f"{name}.npy"
    np.save(path, split.images)
    return Split(Rows(np.load(path, mmap_mode="r")), split.labels)


def _mapped_dataset(tmp_path) -> Dataset:
    ds = quadrant_dataset()
    return Dataset(ds.name, _mapped(ds.train, tmp_path, "train"), _mapped(ds.val, tmp_path, "val"),
                   _mapped(ds.test, tmp_path, "test"), ds.class_names, ds.source)


def test_mapped_prefetched_batches_equal_in_memory_inline_ones(tmp_path):
    memory, mapped = quadrant_dataset().train, _mapped_dataset(tmp_path).train
    inline = list(training_batches(memory, 8, seed=5, epoch=1, augment=AUGMENT))
    ahead, error = _drain(prefetched(training_batches(mapped, 8, seed=5, epoch=1, augment=AUGMENT)))
    assert error is None and len(ahead) == len(inline) == 8
    for (a, la, ma), (b, lb, mb) in zip(ahead, inline):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(ma.partner_labels, mb.partner_labels)
        assert ma.lam == mb.lam


class Recording(SignalAt):
    """The NumPy runner, keeping a copy of every batch it trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(16, 4, *args, **kwargs)
        self.seen = []

    def train_step(self, images, labels, mix=None):
        self.seen.append((images.copy(), labels.copy(), None if mix is None else (mix.partner_labels.copy(), mix.lam)))
        super().train_step(images, labels, mix)


def _fit(dataset, runner, state=None):
    cfg = TrainerConfig(epochs=2, patience=None, batch_size=8, eval_batch_size=16, log_every=3, progress=False)
    saved = []
    trainer = Trainer(runner, dataset, cfg, NullLogger(), ProgressView(False, 2), lambda kind, s: saved.append(s))
    try:
        trainer.fit(state, AUGMENT)
    except TrainingInterrupted:
        pass
    return saved


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (a, la, ma), (b, lb, mb) in zip(got, expected):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(ma[0], mb[0])
        assert ma[1] == mb[1]


def test_the_trainer_sees_the_seeded_batches_and_a_resumed_run_sees_the_rest(tmp_path):
    """From a memory-mapped dataset through the prefetch thread: the uninterrupted run trains on exactly the
    batches of training_batches, in order; a run stopped during epoch 2 and resumed from its saved state trains on
    exactly the batches the uninterrupted run had left."""
    dataset = _mapped_dataset(tmp_path)
    straight = Recording()
    _fit(dataset, straight)
    expected = [(x, y, (m.partner_labels, m.lam)) for epoch in (0, 1)
                for x, y, m in training_batches(quadrant_dataset().train, 8, 0, epoch, AUGMENT)]
    _assert_same_batches(straight.seen, expected)

    stopped = Recording(at=11)  # SIGINT during step 11: epoch 2, after its third batch
    saved = _fit(dataset, stopped)
    state = TrainState.from_dict(saved[-1].to_dict())
    assert (state.epoch, state.batch) == (1, 3)
    resumed = Recording()
    resumed.set_weights(stopped.get_weights())
    _fit(dataset, resumed, state)
    _assert_same_batches(stopped.seen + resumed.seen, straight.seen)
    np.testing.assert_array_equal(resumed.kernel, straight.kernel)


def _rss_file_kb() -> int:
    """This process's resident file-backed memory (mapped pages), from /proc."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="needs madvise (Linux)")
def test_reading_every_batch_of_a_mapped_split_keeps_memory_flat(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)  # 24 MB
    path = tmp_path / "big.npy"
    np.save(path, images)
    split = Split(Rows(np.load(path, mmap_mode="r")), np.zeros(2000, np.int64))
    before = _rss_file_kb()
    total = sum(int(x.sum()) for x, _, _ in prefetched(training_batches(split, 100, 0, 0)))
    assert total == int(images.sum(dtype=np.int64))
    assert _rss_file_kb() - before < 8 * 1024  # a few batches' pages at most, not the 24 MB read


def _folder(root, per_class=6):
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 10), (200 * k, 40 * i, 0)).save(root / name / f"{i}.png")
    return root


def test_an_uncached_folder_is_decoded_per_batch_and_a_corrupt_file_stops_it_by_name(tmp_path, make_cfg):
    """dataset.cache=false: batches equal the cached run's; a file that breaks after loading (mid-epoch) ends
    the loader with a UserError naming it, well within the timeout, never a hang."""
    root = _folder(tmp_path / "imgs")
    settings = dict(root=str(root), image_size=(10, 10), num_classes=2, val_fraction=0.0, test_fraction=0.0)
    cached = load_dataset(make_cfg("folder", **settings))
    uncached = load_dataset(make_cfg("folder", cache=False, **settings))
    assert not list(root.rglob("*.npy"))  # nothing cached under the images either way
    assert (uncached.mean, uncached.std) == (cached.mean, cached.std)
    for (a, la, _), (b, lb, _) in zip(training_batches(uncached.train, 4, 0, 0), training_batches(cached.train, 4, 0, 0)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)

    broken = root / "b" / "3.png"
    broken.write_bytes(b"not a png at all")
    items, error = _drain(prefetched(training_batches(uncached.train, 2, 0, 0)))
    assert isinstance(error, UserError), error
    assert str(broken) in str(error) and "could not be read (decoded as needed" in str(error)
    assert len(items) < 6  # of 6 batches: stopped at the one that holds it
