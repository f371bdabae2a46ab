"""dataset=folder: your own images, one sub-folder per class, PNG or JPEG of any size.

``dataset.root`` holds either the class folders (split here: stratified by ``val_fraction``/``test_fraction``
with ``split_seed``), or ``train/`` (and optionally ``val/``, ``test/``) folders that each hold the class
folders; a missing val/ or test/ is carved out of train/. Every image is converted to grayscale or RGB
(``dataset.channels`` 1 or 3) and resized to ``dataset.image_size``; class names are the sorted folder names.
Decoded arrays are cached under the data home, keyed by every file's path, size and mtime and the target size,
and read memory-mapped. With ``dataset.cache=false`` nothing is cached: each batch's files are decoded when the
batch is prepared (by a thread pool, ahead of the training step), and only the train split's channel statistics
are kept (a small JSON file).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnrun.data import Dataset, Split, cache, stratified_split, channel_stats
from cnnrun.data.rows import mapped_rows, release
from cnnrun.errors import UserError
from cnnrun.preflight import folder_root_problem
from cnnrun.progress import ItemProgress

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
    size = tuple(cfg.image_size)
    key = cache.cache_key(cache.file_entries(files, base=root), size, cfg.channels, class_names, parts.tolist())
    if cfg.cache:
        images = _decoded(root, files, key, size, cfg.channels)
    else:
        images = DecodedFiles(files, size, cfg.channels)
    present = {SPLITS[p] for p in np.unique(parts) if p != _UNSPLIT}
    train, val, test = split_indices(labels, parts, present, cfg)
    if len(train) == 0:
        raise UserError(f"{root}: no images left for training after the split; add images or lower the fractions")
    train_images = mapped_rows(images, train)
    mean, std = channel_stats(train_images) if cfg.cache else _uncached_stats(root, train_images, key, train)
    return Dataset(
        name="folder",
        train=Split(train_images, labels[train]),
        val=Split(mapped_rows(images, val), labels[val]),
        test=Split(mapped_rows(images, test), labels[test]),
        class_names=class_names,
        source=str(root),
        mean=mean,
        std=std,
        test_is_carved="test" not in present,
        content_key="" if cfg.cache else key,
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


def _cache_dir(root: Path) -> Path:
    return cache.data_home() / "folder" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _decoded(root: Path, files: Sequence[Path], key: str, size: Tuple[int, int], channels: int) -> np.ndarray:
    """All images as a read-only (N, H, W, C) uint8 memory map: the cache when no file changed, else decoded
    in threads straight into a new cache file (never the whole dataset in RAM), with a progress bar."""
    cache_dir = _cache_dir(root)
    cached = cache.load_arrays(cache_dir, "folder", key, _ARRAYS)
    if cached is not None and len(cached["images"]) == len(files):
        return cached["images"]
    try:
        writer = cache.MappedWriter(cache_dir, "folder", key, "images", (len(files), *size, channels), np.uint8)
    except OSError:  # a read-only data home or a full disk: decode into RAM, as the cache cannot hold it
        images, bad = _decode_many(files, np.arange(len(files)), size, channels)
        if bad:
            raise unreadable(bad, f"{len(bad)} image(s) under {root} could not be read")
        return images
    with writer, ItemProgress(f"decoding images under {root} (once, then cached)", len(files), True) as bar:
        bad: List[str] = []
        for start in range(0, len(files), _DECODE_CHUNK):
            positions = np.arange(start, min(start + _DECODE_CHUNK, len(files)))
            images, failed = _decode_many(files, positions, size, channels)
            writer.array[start : start + len(positions)] = images
            release(writer.array)
            bad += failed
            bar.advance(len(positions))
        if bad:
            raise unreadable(bad, f"{len(bad)} image(s) under {root} could not be read")
        return writer.commit()


class DecodedFiles:
    """Image files decoded when a batch asks for them (``dataset.cache=false``): a row source for
    :class:`~cnnrun.data.rows.Rows`, decoding in a thread pool (Pillow releases the GIL while decoding).

    An unreadable file is fatal: training stops with a :class:`UserError` that names it (the last epoch's
    checkpoint is kept), rather than quietly train on a different set of images than the seed and the split
    say. Fix or delete the file and resume.
    """

    def __init__(self, files: Sequence[Path], size: Tuple[int, int], channels: int):
        self.files, self.size, self.channels = list(files), tuple(size), channels
        self.shape = (len(self.files), *self.size, channels)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.files)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        images, bad = _decode_many(self.files, positions, self.size, self.channels)
        if bad:
            raise unreadable(bad, f"{len(bad)} image(s) could not be read (decoded as needed: dataset.cache=false)")
        return images


def _decode_many(files, positions, size, channels) -> Tuple[np.ndarray, List[str]]:
    """(images, ["<file>: why", ...] for the ones that failed, their rows left zero)."""
    images = np.zeros((len(positions), *size, channels), np.uint8)

    def decode(i: int) -> Optional[str]:
        image, why = read_image(files[positions[i]], size, channels)
        if image is None:
            return f"{files[positions[i]]}: {why}"
        images[i] = image
        return None

    bad = [why for why in _pool().map(decode, range(len(positions))) if why]
    return images, bad


_DECODE_CHUNK = 1024  # images decoded, written and released at a time when filling the cache
_POOL: List[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """One decoding pool per process, made on first use (its threads idle between batches)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode"))
    return _POOL[0]


def unreadable(bad: List[str], headline: str) -> UserError:
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return UserError(f"{headline}:\n  " + "\n  ".join(bad[:MAX_LISTED]) + more + "\nfix: replace or delete them")


def _uncached_stats(root: Path, train_images, key: str, train: np.ndarray):
    """The train split's channel statistics without a cache of images: one decoding pass, its result kept in a
    small JSON file keyed like the cache (and by the split), so later runs start at once."""
    path = _cache_dir(root) / f"stats-{cache.cache_key([key], train.tolist())}.json"
    try:
        stored = json.loads(path.read_text())
        return tuple(stored["mean"]), tuple(stored["std"])
    except (OSError, ValueError, KeyError):
        pass
    mean, std = channel_stats(train_images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"mean": mean, "std": std}))
    except OSError:
        pass  # not writable: computed again next time
    return mean, std


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
