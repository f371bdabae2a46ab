"""dataset=folder: your own images, one sub-folder per class, PNG or JPEG of any size.

``dataset.root`` holds either the class folders (split here: stratified by ``val_fraction``/``test_fraction``
with ``split_seed``), or ``train/`` (and optionally ``val/``, ``test/``) folders that each hold the class
folders; a missing val/ or test/ is carved out of train/. Every image is converted to grayscale or RGB
(``dataset.channels`` 1 or 3) and resized to ``dataset.image_size``; class names are the sorted folder names.
Decoded arrays are cached under the data home, keyed by every file's path, size and mtime and the target size.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnrun.data import Dataset, Split, cache, stratified_split, channel_stats
from cnnrun.errors import UserError
from cnnrun.preflight import folder_root_problem

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # bad files named in an error; the rest are counted
_ARRAYS = ("images",)
_UNSPLIT = -1  # the part code of images in a root without train/ val/ test/


def load(cfg) -> Dataset:
    """Scan dataset.root, decode (or load from cache) every image, split, and return the Dataset."""
    problem = folder_root_problem(cfg.root)
    if problem:
        raise UserError(f"dataset.root: {problem}")
    root = Path(cfg.root).expanduser()
    if min(cfg.image_size) < 1:
        raise UserError(f"dataset.image_size={list(cfg.image_size)}: both sides must be at least 1 pixel")
    if cfg.channels not in (1, 3):
        raise UserError(f"dataset.channels={cfg.channels}: dataset=folder makes grayscale (1) or RGB (3) images")
    class_names, files, labels, parts = scan(root)
    images = _decoded(root, files, parts, class_names, tuple(cfg.image_size), cfg.channels)
    present = {SPLITS[p] for p in np.unique(parts) if p != _UNSPLIT}
    train, val, test = split_indices(labels, parts, present, cfg)
    if len(train) == 0:
        raise UserError(f"{root}: no images left for training after the split; add images or lower the fractions")
    train_images = images[train]
    mean, std = channel_stats(train_images)
    return Dataset(
        name="folder",
        train=Split(train_images, labels[train]),
        val=Split(images[val], labels[val]),
        test=Split(images[test], labels[test]),
        class_names=class_names,
        source=str(root),
        mean=mean,
        std=std,
        test_is_carved="test" not in present,
    )


def scan(root: Path) -> Tuple[Tuple[str, ...], List[Path], np.ndarray, np.ndarray]:
    """(class names, image paths, labels, part codes: 0/1/2 for train/val/test folders, -1 when unsplit)."""
    split_dirs = [name for name in SPLITS if (root / name).is_dir()]
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"{root} has {', '.join(d + '/' for d in split_dirs)} but no train/ folder")
    top = root / "train" if split_dirs else root
    class_names = tuple(_class_dirs(top))
    if not class_names:
        raise UserError(
            f"{top}: no class folders; put each class's images in a sub-folder named after it, "
            f"e.g. {top / 'cat' / '0001.png'}"
        )
    files: List[Path] = []
    labels: List[int] = []
    parts: List[int] = []
    empty: List[str] = []
    for part, base in ([(SPLITS.index(d), root / d) for d in split_dirs] or [(_UNSPLIT, root)]):
        names = _class_dirs(base)
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise UserError(
                f"{base}: class folder(s) {', '.join(unknown)} are not in {top} (classes: {', '.join(class_names)})"
            )
        for label, name in enumerate(class_names):
            if name not in names:
                continue
            found = image_files(base / name)
            if not found:
                empty.append(str(base / name))
            files += found
            labels += [label] * len(found)
            parts += [part] * len(found)
    if empty:
        raise UserError(
            f"empty class folder(s), with no {'/'.join(e[1:].upper() for e in EXTENSIONS)} images: "
            + ", ".join(empty)
            + "; add images or remove the folder"
        )
    return class_names, files, np.array(labels, np.int64), np.array(parts, np.int64)


def split_indices(labels: np.ndarray, parts: np.ndarray, present: set, cfg) -> Tuple[np.ndarray, ...]:
    """Indices of train, val and test: the folders' own where they exist, else carved from train (stratified)."""
    if not present:
        return stratified_split(labels, (cfg.val_fraction, cfg.test_fraction), cfg.split_seed)
    train_idx = np.flatnonzero(parts == 0)
    carve = [name for name in ("val", "test") if name not in present]
    fractions = [cfg.val_fraction if name == "val" else cfg.test_fraction for name in carve]
    pieces = stratified_split(labels[train_idx], fractions, cfg.split_seed)
    carved = dict(zip(carve, (train_idx[p] for p in pieces[1:])))
    val = carved["val"] if "val" in carved else np.flatnonzero(parts == 1)
    test = carved["test"] if "test" in carved else np.flatnonzero(parts == 2)
    return train_idx[pieces[0]], val, test


def _class_dirs(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(directory: Path) -> List[Path]:
    """Image files under ``directory`` (sub-folders too), sorted; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in EXTENSIONS
        ]
    return found


def _decoded(
    root: Path,
    files: Sequence[Path],
    parts: np.ndarray,
    class_names: Tuple[str, ...],
    size: Tuple[int, int],
    channels: int,
) -> np.ndarray:
    """All images as (N, H, W, C) uint8, from the cache when no file changed, else decoded in threads."""
    cache_dir = cache.data_home() / "folder" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    key = cache.cache_key(cache.file_entries(files, base=root), size, channels, class_names, parts.tolist())
    cached = cache.load_arrays(cache_dir, "folder", key, _ARRAYS)
    if cached is not None and len(cached["images"]) == len(files):
        return cached["images"]
    images = np.empty((len(files), size[0], size[1], channels), np.uint8)

    def decode(i: int) -> Optional[str]:
        image, why = read_image(files[i], size, channels)
        if image is None:
            return f"{files[i]}: {why}"
        images[i] = image
        return None

    # Pillow releases the GIL while decoding, so threads give a real speed-up on many small files
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bad = [why for why in pool.map(decode, range(len(files))) if why]
    if bad:
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise UserError(
            f"{len(bad)} image(s) under {root} could not be read:\n  "
            + "\n  ".join(bad[:MAX_LISTED])
            + more
            + "\nfix: replace or delete them"
        )
    cache.save_arrays(cache_dir, "folder", key, {"images": images})
    return images


def read_image(path: Path, size: Tuple[int, int], channels: int) -> Tuple[Optional[np.ndarray], str]:
    """(:func:`decode_image`'s array, "") or (None, why the file could not be read)."""
    try:
        return decode_image(path, size, channels), ""
    except UnidentifiedImageError:
        return None, "not an image Pillow can identify"
    except Exception as err:  # any decoder failure is the file's fault: report it, don't crash
        return None, str(err) or type(err).__name__


def decode_image(path: Path, size: Tuple[int, int], channels: int) -> np.ndarray:
    """One image file as (H, W, C) uint8: EXIF rotation applied, converted to L or RGB, resized to ``size``."""
    height, width = size
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as img:
        side = max(width, height)  # square: the EXIF rotation below may swap width and height
        img.draft(mode, (side, side))  # JPEG: decode at a reduced scale when far larger than needed
        img = ImageOps.exif_transpose(img)
        if img.mode == "I" or img.mode.startswith("I;16"):
            # 16-bit grayscale: Pillow's convert would clip at 255, so keep the high byte instead
            img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
        if img.mode not in ("L", "RGB") and "transparency" in img.info:
            img = img.convert("RGBA")  # palette transparency must go through RGBA to convert cleanly
        img = img.convert(mode)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).reshape(height, width, channels)
