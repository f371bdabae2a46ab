"""Augmentations on whole uint8 batches, vectorised, driven by one seeded generator per batch.

The trainer seeds a generator from (seed, epoch, batch), so a run resumed mid-epoch augments every batch
exactly as the uninterrupted run did. Image augmentations keep uint8 pixels; mixing ones (mixup, cutmix)
return the partner labels and the weight λ that the loss needs (see :class:`Mix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class Mix:
    """A mixed batch's loss: λ·CE(labels) + (1 − λ)·CE(partner_labels)."""

    partner_labels: np.ndarray
    lam: float


def augment_batch(images: np.ndarray, augment, rng: np.random.Generator) -> np.ndarray:
    """Random resized crop, random crop after zero padding, and random flips, in that order."""
    if augment.random_resized_crop:
        images = random_resized_crop(images, augment.resized_crop_scale, augment.resized_crop_ratio, rng)
    if augment.random_crop_padding:
        images = _padded_crop(images, augment.random_crop_padding, rng)
    if augment.horizontal_flip:
        images = _flip(images, rng, axis=2)
    if augment.vertical_flip:
        images = _flip(images, rng, axis=1)
    return images


def mixes(augment) -> bool:
    return bool(augment.mixup_alpha or augment.cutmix_alpha)


def mix_batch(images: np.ndarray, labels: np.ndarray, augment, rng: np.random.Generator) -> Tuple[np.ndarray, Mix]:
    """Mixup or cutmix (one of them, at even odds, when both are on) with a partner batch: the batch reversed
    in a random rotation, so that every image has a different partner whenever the batch has two images."""
    n = len(images)
    partner = np.roll(np.arange(n), int(rng.integers(1, n)) if n > 1 else 0)
    use_cutmix = augment.cutmix_alpha and (not augment.mixup_alpha or rng.random() < 0.5)
    alpha = augment.cutmix_alpha if use_cutmix else augment.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if use_cutmix:
        images, lam = _cutmix(images, images[partner], lam, rng)
    else:
        # In pixel space, rounded to uint8: normalisation is affine, so this is the same mix up to ±0.5 levels.
        mixed = lam * images.astype(np.float32) + (1.0 - lam) * images[partner].astype(np.float32)
        images = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return images, Mix(labels[partner], lam)


def _cutmix(images: np.ndarray, partners: np.ndarray, lam: float, rng) -> Tuple[np.ndarray, float]:
    """Paste a box of area (1 − λ) from the partners (centre uniform, clipped at the borders); λ becomes the
    exact share of each image's pixels that stay its own."""
    _, h, w, _ = images.shape
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2 + box_h % 2, h)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2 + box_w % 2, w)
    out = images.copy()
    out[:, top:bottom, left:right] = partners[:, top:bottom, left:right]
    return out, 1.0 - (bottom - top) * (right - left) / (h * w)


def _padded_crop(images: np.ndarray, pad: int, rng) -> np.ndarray:
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=n)
    dx = rng.integers(0, 2 * pad + 1, size=n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _flip(images: np.ndarray, rng, axis: int) -> np.ndarray:
    flip = rng.random(len(images)) < 0.5
    if flip.any():
        images = images.copy()
        images[flip] = np.flip(images[flip], axis=axis)
    return images


def random_resized_crop(images: np.ndarray, scale, ratio, rng, attempts: int = 10) -> np.ndarray:
    """torchvision's RandomResizedCrop on a batch: a box of random area (``scale`` of the image) and aspect
    ratio (log-uniform in ``ratio``), the first of ``attempts`` draws that fits (else the whole image), resized
    back to the image size bilinearly with half-pixel centres (``align_corners=False``)."""
    n, h, w, _ = images.shape
    area = rng.uniform(scale[0], scale[1], (n, attempts)) * h * w
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    box_w = np.rint(np.sqrt(area * aspect)).astype(int)
    box_h = np.rint(np.sqrt(area / aspect)).astype(int)
    fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
    first = fits.argmax(axis=1)
    found = fits[np.arange(n), first]
    box_h = np.where(found, box_h[np.arange(n), first], h)
    box_w = np.where(found, box_w[np.arange(n), first], w)
    top = (rng.random(n) * (h - box_h + 1)).astype(int)
    left = (rng.random(n) * (w - box_w + 1)).astype(int)
    return _resize_boxes(images, top, left, box_h, box_w)


def _resize_boxes(images: np.ndarray, top, left, box_h, box_w) -> np.ndarray:
    """Each image's box (top, left, box_h, box_w) resized to the full image size, bilinear, rounded to uint8."""
    n, h, w, _ = images.shape
    r0, r1, wr = _source_positions(top, box_h, h)  # (n, h) each
    c0, c1, wc = _source_positions(left, box_w, w)
    batch = np.arange(n)[:, None, None]
    source = images.astype(np.float32)

    def at(r, c):
        return source[batch, r[:, :, None], c[:, None, :]]

    wr, wc = wr[:, :, None, None], wc[:, None, :, None]
    upper = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
    lower = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
    return np.clip(np.rint(upper * (1 - wr) + lower * wr), 0, 255).astype(np.uint8)


def _source_positions(start, length, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, for each of ``size`` output pixels: the two source indices around its centre inside the
    box (the second clamped to the box) and the weight of the second."""
    centre = (np.arange(size)[None, :] + 0.5) * (length[:, None] / size) - 0.5
    centre = np.clip(centre, 0, (length - 1)[:, None])
    lower = np.floor(centre).astype(int)
    upper = np.minimum(lower + 1, (length - 1)[:, None])
    weight = (centre - lower).astype(np.float32)
    return start[:, None] + lower, start[:, None] + upper, weight
