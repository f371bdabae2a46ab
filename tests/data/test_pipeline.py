"""Batching and augmentation: deterministic orders, exact shapes, crops that are real windows of the input."""

from __future__ import annotations

import numpy as np
import pytest

from cnnrun.config import AugmentConfig
from cnnrun.data import Split
from cnnrun.data.pipeline import augment_batch, epoch_order, iterate_batches, num_batches


def _split(n: int = 10, h: int = 4, w: int = 5, c: int = 2) -> Split:
    images = np.arange(n * h * w * c, dtype=np.int64).reshape(n, h, w, c) % 251
    return Split(images.astype(np.uint8), np.arange(n, dtype=np.int64))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=0)
    assert sorted(a) == list(range(100))
    np.testing.assert_array_equal(a, epoch_order(100, seed=3, epoch=0))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=0))


def test_batches_in_stored_order_with_a_short_last_batch():
    split = _split(10)
    batches = list(iterate_batches(split, batch_size=4))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert batches[0][0].shape == (4, 4, 5, 2) and batches[0][0].dtype == np.uint8
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]), np.arange(10))
    np.testing.assert_array_equal(batches[2][0], split.images[8:])


def test_batches_follow_an_order_and_resume_mid_epoch():
    split = _split(11)
    order = epoch_order(11, seed=0, epoch=2)
    full = list(iterate_batches(split, 3, order=order))
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in full]), order)
    for images, labels in full:
        np.testing.assert_array_equal(images, split.images[labels])  # images stay with their labels
    resumed = list(iterate_batches(split, 3, order=order, start_batch=2))
    assert len(resumed) == 2
    for (a, la), (b, lb) in zip(full[2:], resumed):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("n,size,expected", [(9, 4, [4, 5]), (10, 3, [3, 3, 4]), (5, 2, [2, 3]), (1, 4, [1]),
                                             (4, 1, [1, 1, 1, 1]), (8, 4, [4, 4]), (6, 4, [4, 2])])
def test_a_last_batch_of_one_image_joins_the_batch_before(n, size, expected):
    split = _split(n)
    order = epoch_order(n, seed=1, epoch=0)
    batches = list(iterate_batches(split, size, order=order))
    assert [len(labels) for _, labels in batches] == expected and num_batches(n, size) == len(expected)
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in batches]), order)  # every image, once
    resumed = list(iterate_batches(split, size, order=order, start_batch=len(expected) - 1))
    np.testing.assert_array_equal(resumed[0][1], batches[-1][1])  # a resumed run's last batch is the same


def test_no_augmentation_without_an_rng():
    split = _split(6)
    aug = AugmentConfig(random_crop_padding=2, horizontal_flip=True)
    (images, _), = iterate_batches(split, 6, augment=aug)
    np.testing.assert_array_equal(images, split.images)


@pytest.mark.parametrize("pad", [1, 3])
def test_random_crop_is_a_window_of_the_zero_padded_image(pad):
    split = _split(16)
    out = augment_batch(split.images, AugmentConfig(random_crop_padding=pad), np.random.default_rng(0))
    assert out.shape == split.images.shape and out.dtype == np.uint8
    padded = np.pad(split.images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = split.images.shape[1:3]
    offsets = set()
    for i in range(len(out)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(out[i], padded[i, dy : dy + h, dx : dx + w])
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        offsets.update(matches)
    assert len(offsets) > 1  # not always the same window


def test_horizontal_flip_flips_some_and_keeps_the_rest():
    split = _split(64)
    out = augment_batch(split.images, AugmentConfig(horizontal_flip=True), np.random.default_rng(1))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, split.images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, split.images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54
    np.testing.assert_array_equal(split.images, _split(64).images)  # the input is never modified


def test_augmentation_is_deterministic_for_a_seed():
    split = _split(32)
    aug = AugmentConfig(random_crop_padding=2, horizontal_flip=True)
    a = [b for b, _ in iterate_batches(split, 8, augment=aug, rng=np.random.default_rng(7))]
    b = [b for b, _ in iterate_batches(split, 8, augment=aug, rng=np.random.default_rng(7))]
    c = [b for b, _ in iterate_batches(split, 8, augment=aug, rng=np.random.default_rng(8))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_no_op_augmentation_returns_the_batch():
    split = _split(4)
    out = augment_batch(split.images, AugmentConfig(), np.random.default_rng(0))
    np.testing.assert_array_equal(out, split.images)
