"""Augmentations: what each one does to a batch, checked against its definition (and torch's resize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnrun.config import AugmentConfig
from cnnrun.data.augment import _resize_boxes, augment_batch, mix_batch, random_resized_crop


def _images(n=16, h=12, w=10, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_a_resized_crop_of_the_whole_image_is_the_image():
    images = _images()
    out = random_resized_crop(images, (1.0, 1.0), (10 / 12, 10 / 12), np.random.default_rng(0))
    np.testing.assert_array_equal(out, images)


def test_box_resizing_is_bilinear_with_half_pixel_centres_as_torch():
    images = _images(n=3, h=9, w=11)
    top, left, box_h, box_w = np.array([0, 2, 4]), np.array([1, 0, 5]), np.array([5, 7, 3]), np.array([4, 11, 6])
    out = _resize_boxes(images, top, left, box_h, box_w)
    for i in range(3):
        crop = images[i, top[i]:top[i] + box_h[i], left[i]:left[i] + box_w[i]]
        x = torch.from_numpy(crop.astype(np.float32)).permute(2, 0, 1)[None]
        expected = torch.nn.functional.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False)
        expected = expected[0].permute(1, 2, 0).numpy()
        assert np.abs(out[i].astype(np.float32) - expected).max() <= 0.5 + 1e-4  # rounding to uint8 only


def test_random_resized_crops_differ_between_images_and_repeat_for_a_seed():
    images = np.repeat(_images(n=1, h=32, w=32), 8, axis=0)
    a = random_resized_crop(images, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(3))
    b = random_resized_crop(images, (0.08, 1.0), (0.75, 4 / 3), np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == images.shape and a.dtype == np.uint8
    assert len({x.tobytes() for x in a}) == 8


def test_vertical_flip_flips_some_and_keeps_the_rest():
    images = _images(n=64)
    out = augment_batch(images, AugmentConfig(vertical_flip=True), np.random.default_rng(1))
    flipped = [np.array_equal(o, i[::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_mixup_blends_each_image_with_another_one_and_returns_its_label():
    images, labels = _images(), np.arange(16)
    out, mix = mix_batch(images, labels, AugmentConfig(mixup_alpha=0.4), np.random.default_rng(5))
    assert 0.0 < mix.lam < 1.0
    partner = mix.partner_labels  # labels are indices here
    assert (partner != labels).all()
    expected = np.rint(mix.lam * images.astype(np.float32) + (1 - mix.lam) * images[partner].astype(np.float32))
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_cutmix_pastes_one_box_and_lambda_is_the_share_left_unpasted():
    images, labels = _images(h=20, w=20), np.arange(16)
    for seed in range(10):
        out, mix = mix_batch(images, labels, AugmentConfig(cutmix_alpha=1.0), np.random.default_rng(seed))
        own = np.all(out == images, axis=-1)
        pasted = np.all(out == images[mix.partner_labels], axis=-1)
        assert (own | pasted).all()
        changed = ~own & pasted
        # the pasted pixels form the same box in every image, of area (1 - λ) of the image
        rows, cols = np.nonzero(~np.all(out == images, axis=(0, -1)) | changed.any(axis=0))
        box = np.zeros((20, 20), bool)
        if len(rows):
            box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert mix.lam == pytest.approx(1 - box.sum() / 400)


def test_with_both_on_each_batch_uses_one_of_them():
    images, labels = _images(h=16, w=16), np.arange(16)
    kinds = set()
    for seed in range(20):
        out, mix = mix_batch(images, labels, AugmentConfig(mixup_alpha=1.0, cutmix_alpha=1.0),
                             np.random.default_rng(seed))
        own_or_partner = (np.all(out == images, axis=-1) | np.all(out == images[mix.partner_labels], axis=-1))
        kinds.add("cutmix" if own_or_partner.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize("key, value", [("resized_crop_scale", (0.5, 1.5)), ("resized_crop_ratio", (2.0, 1.0)),
                                        ("mixup_alpha", -1.0)])
def test_bad_settings_are_refused(key, value):
    with pytest.raises(ValueError):
        AugmentConfig(**{key: value})
