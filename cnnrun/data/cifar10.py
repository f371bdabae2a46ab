"""CIFAR-10: 50,000 train + 10,000 test 32×32 colour images in 10 classes, from the official python tarball.

The tarball's batches are Python pickles. Unpickling can run arbitrary code, so they are read with an
unpickler that only rebuilds what a batch holds (dicts, lists, numbers, strings and uint8 numpy arrays) and
refuses every other global; and the tarball is never extracted to disk: the seven expected members are read
into memory by exact name, so no member path can escape anywhere. The official train set is split into
train/val by ``val_fraction`` (stratified, ``split_seed``); the official test set is the test split.
"""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
import tarfile
import zlib
from pathlib import PurePosixPath
from typing import Any, Dict, Tuple

import numpy as np

from cnnrun.data import Dataset, Split, cache, stratified_split, channel_stats
from cnnrun.data.rows import mapped_rows
from cnnrun.data.download import Checksum, RemoteFile, ensure_files
from cnnrun.errors import UserError

MIRRORS: Tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
# The published MD5 is c58f30108f718f92721af3b95e74349a; this is the same file's SHA-256 (as Keras pins it).
ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz", Checksum("sha256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")
)
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
MEMBERS = TRAIN_BATCHES + ("test_batch", "batches.meta")
MAX_MEMBER_BYTES = 64 << 20  # a real batch is 31 MB
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


def _numpy_private(module: str, name: str):
    """numpy.core.<module>.<name>; NumPy 2 moved numpy.core to numpy._core (pickles may name either)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this NumPy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """codecs.encode, limited to the one codec a pickled bytes object uses."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return codecs.encode(text, encoding)


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals that pickled numpy arrays need; anything else is refused, not imported."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_private("multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_private("multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_private("numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_private("numeric", "_frombuffer"),
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,  # how protocol 2 spells bytes when written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def safe_unpickle(data: bytes, source: str) -> Any:
    """Unpickle a CIFAR batch without letting it run code; UserError naming ``source`` when it is refused."""
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any malformed pickle: a clear message, not a traceback
        raise UserError(f"{source}: not a valid CIFAR-10 batch ({err}); delete it and fetch it again") from None


def load(cfg) -> Dataset:
    """dataset=cifar10: 60,000 32×32 RGB images."""
    if cfg.channels != 3 or tuple(cfg.image_size) != (32, 32):
        raise UserError(
            "dataset=cifar10 has 3×32×32 images; set dataset.channels=3 dataset.image_size=[32,32] "
            f"(got channels={cfg.channels}, image_size={list(cfg.image_size)})"
        )
    data_dir = cache.data_dir(cfg, "cifar10")
    archive = data_dir / ARCHIVE.name
    arrays, source = None, str(archive)
    if archive.is_file():  # decoded before from this very file: no need to verify or decode again
        key = cache.cache_key(cache.file_entries([archive]), ARCHIVE.checksum.hexdigest)
        arrays = cache.load_arrays(data_dir, "cifar10", key, _ARRAYS)
    if arrays is None:
        fetched = ensure_files([ARCHIVE], MIRRORS, data_dir, download=cfg.download, dataset="cifar10")
        if ARCHIVE.name in fetched.urls:
            source = f"{fetched.urls[ARCHIVE.name]} (cached in {data_dir})"
        arrays = decode_archive(archive)
        key = cache.cache_key(cache.file_entries([archive]), ARCHIVE.checksum.hexdigest)
        cache.save_arrays(data_dir, "cifar10", key, arrays)
    train_labels = np.array(arrays["train_labels"])
    train, val = stratified_split(train_labels, (cfg.val_fraction,), cfg.split_seed)
    train_images = mapped_rows(arrays["train_images"], train)
    mean, std = channel_stats(train_images)
    return Dataset(
        name="cifar10",
        train=Split(train_images, train_labels[train]),
        val=Split(mapped_rows(arrays["train_images"], val), train_labels[val]),
        test=Split(mapped_rows(arrays["test_images"]), np.array(arrays["test_labels"])),
        class_names=tuple(str(c) for c in arrays["class_names"]),
        source=source,
        mean=mean,
        std=std,
    )


def decode_archive(path) -> Dict[str, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 for train and test, and the class names."""
    members = read_members(path)
    meta = _as_dict(safe_unpickle(members["batches.meta"], f"{path}:batches.meta"), f"{path}:batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10 or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}:batches.meta: label_names should be 10 strings")
    train = [_batch(members[m], f"{path}:{m}") for m in TRAIN_BATCHES]
    test = _batch(members["test_batch"], f"{path}:test_batch")
    return {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": test[0],
        "test_labels": test[1],
        "class_names": np.array(names, dtype="U32"),  # a fixed-width str array: no pickle needed to cache it
    }


def read_members(path) -> Dict[str, bytes]:
    """The expected batch files' bytes, read from the tarball in memory (nothing is extracted)."""
    found: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if len(parts) != 2 or parts[0] != FOLDER or parts[1] not in MEMBERS:
                    continue  # readme.html, and anything unexpected: never looked at
                if not member.isfile():
                    raise UserError(f"{path}: {member.name} is not a regular file (a link?); refusing the archive")
                if parts[1] in found:
                    raise UserError(f"{path}: {member.name} appears twice; refusing the archive")
                if member.size > MAX_MEMBER_BYTES:
                    raise UserError(f"{path}: {member.name} is {member.size:,} bytes, too large for a CIFAR batch")
                found[parts[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(f"{path}: not a readable tar.gz ({err}); delete it and fetch it again") from None
    missing = [m for m in MEMBERS if m not in found]
    if missing:
        names = ", ".join(f"{FOLDER}/{m}" for m in missing)
        raise UserError(f"{path}: no {names} inside; is it cifar-10-python.tar.gz?")
    return found


def _as_dict(obj: Any, source: str) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a dict, found {type(obj).__name__}")
    # Python 2 pickles may come back with bytes keys, depending on how they were written
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(data: bytes, source: str) -> Tuple[np.ndarray, np.ndarray]:
    batch = _as_dict(safe_unpickle(data, source), source)
    pixels, labels = batch.get("data"), batch.get("labels")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise UserError(f"{source}: 'data' should be a uint8 array of shape (N, 3072)")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(pixels):
        raise UserError(f"{source}: 'labels' should hold one label per image ({len(pixels)})")
    labels_array = np.asarray(labels)
    in_range = labels_array.size == 0 or (labels_array.min() >= 0 and labels_array.max() <= 9)
    if labels_array.dtype.kind not in "iu" or not in_range:
        raise UserError(f"{source}: labels should be integers 0..9")
    # stored as (N, 3 channels, 32, 32) planes; the rest of cnnrun wants (N, H, W, C)
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels_array.astype(np.int64)

