"""The full MNIST digits (60,000 train + 10,000 test, 28×28 grayscale), and the loader every IDX dataset shares.

The four official IDX gz files are found, in order: in the data folder (``dataset.root`` or the cache), in
any system folder a package installs them to, else downloaded from the mirrors. Whichever copy is used, its
decompressed content must match the published SHA-256, so a recompressed copy (as Debian ships) is accepted
and a corrupt one never is. The official train set is split into train/val by ``val_fraction`` (stratified,
``split_seed``); the official test set is the test split (``test_fraction`` is not used).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cnnrun.data import Dataset, Split, cache, stratified_split, channel_stats
from cnnrun.data.rows import mapped_rows
from cnnrun.data.download import Checksum, RemoteFile, ensure_files, no_data_error
from cnnrun.data.idx import IdxError, read_idx
from cnnrun.errors import UserError

# The same files on every mirror, tried in order (yann.lecun.com has been unreliable since 2023: last).
MIRRORS: Tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
# Published SHA-256 of the gz files as distributed (their MD5s, as torchvision lists them, match too).
FILES: Tuple[RemoteFile, ...] = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        Checksum("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        Checksum("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        Checksum("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        Checksum("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ),
)
# SHA-256 of the decompressed IDX content, in FILES' order: accepts plain or recompressed copies.
CONTENT_SHA256: Tuple[str, ...] = (
    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
)
SYSTEM_DIRS: Tuple[str, ...] = ()
CLASS_NAMES = tuple(str(d) for d in range(10))

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class IdxDataset:
    """Where an MNIST-format dataset's four files come from and what they must hash to."""

    name: str
    files: Sequence[RemoteFile]  # train images, train labels, test images, test labels
    content_sha256: Sequence[str]
    mirrors: Sequence[str]
    system_dirs: Sequence[str]
    class_names: Tuple[str, ...]


def load(cfg) -> Dataset:
    """dataset=mnist: 70,000 handwritten digits."""
    return load_idx_dataset(cfg, IdxDataset("mnist", FILES, CONTENT_SHA256, MIRRORS, SYSTEM_DIRS, CLASS_NAMES))


def load_idx_dataset(cfg, spec: IdxDataset) -> Dataset:
    """Find (or download) the four verified IDX files, decode them once, split them, return the Dataset."""
    if cfg.channels != 1 or tuple(cfg.image_size) != (28, 28):
        raise UserError(
            f"dataset={spec.name} has 1×28×28 images; set dataset.channels=1 dataset.image_size=[28,28] "
            f"(got channels={cfg.channels}, image_size={list(cfg.image_size)})"
        )
    arrays, source = _arrays(cfg, spec)
    train_labels = np.array(arrays["train_labels"])
    train, val = stratified_split(train_labels, (cfg.val_fraction,), cfg.split_seed)
    train_images = mapped_rows(arrays["train_images"], train)
    mean, std = channel_stats(train_images)
    return Dataset(
        name=spec.name,
        train=Split(train_images, train_labels[train]),
        val=Split(mapped_rows(arrays["train_images"], val), train_labels[val]),
        test=Split(mapped_rows(arrays["test_images"]), np.array(arrays["test_labels"])),
        class_names=spec.class_names,
        source=source,
        mean=mean,
        std=std,
    )


def _arrays(cfg, spec: IdxDataset) -> Tuple[Dict[str, np.ndarray], str]:
    data_dir = cache.data_dir(cfg, spec.name)
    # decoded arrays go next to the raw files, except into a package's folder (dataset.root=/usr/share/...)
    system = {Path(d).resolve() for d in spec.system_dirs}
    cache_dir = cache.data_home() / spec.name if data_dir.resolve() in system else data_dir
    looked: List[str] = []
    for directory in dict.fromkeys([data_dir, *map(Path, spec.system_dirs)]):  # dataset.root may be one
        paths = _find(directory, spec, looked)
        if paths is None:
            continue
        try:
            return _decoded(paths, spec, cache_dir), str(directory)
        except IdxError as err:
            looked.append(str(err))
    if not cfg.download:
        missing = [f.name for f in spec.files]
        raise no_data_error(spec.name, missing, looked, download=False)
    # ensure_files re-checks data_dir file by file and says what it found there: drop our summary of it
    elsewhere = [line for line in looked if not line.startswith(f"{data_dir}: ")]
    fetched = ensure_files(spec.files, spec.mirrors, data_dir, download=True, dataset=spec.name, looked=elsewhere)
    paths = [fetched.paths[f.name] for f in spec.files]
    urls = sorted({url.rsplit("/", 1)[0] + "/" for url in fetched.urls.values()})
    source = f"{', '.join(urls)} (cached in {data_dir})" if urls else str(data_dir)
    return _decoded(paths, spec, cache_dir), source


def _find(directory: Path, spec: IdxDataset, looked: List[str]) -> Optional[List[Path]]:
    """The four files in ``directory`` (each gzipped, or already gunzipped), or None (noted in ``looked``)."""
    paths, missing = [], []
    for file in spec.files:
        plain = directory / file.name[: -len(".gz")] if file.name.endswith(".gz") else None
        candidates = [directory / file.name] + ([plain] if plain else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(file.name)
        paths.append(found)
    if missing:
        some = len(missing) < len(spec.files)
        looked.append(f"{directory}: missing {', '.join(missing)}" if some else f"{directory}: not there")
        return None
    return paths


def _decoded(paths: Sequence[Path], spec: IdxDataset, cache_dir: Path) -> Dict[str, np.ndarray]:
    """The decoded arrays: from the .npy cache when the raw files are unchanged, else decoded and verified."""
    key = cache.cache_key(cache.file_entries(paths), list(spec.content_sha256))
    arrays = cache.load_arrays(cache_dir, spec.name, key, _ARRAYS)
    if arrays is not None:
        return arrays
    arrays = {}
    for name, path, digest in zip(_ARRAYS, paths, spec.content_sha256):
        hasher = hashlib.sha256()
        is_images = name.endswith("images")
        array = read_idx(path, ndim=3 if is_images else 1, shape_tail=(28, 28) if is_images else (), hasher=hasher)
        if hasher.hexdigest() != digest:
            raise IdxError(
                f"{path}: content sha256 mismatch (corrupt, or not the official {spec.name} file): "
                f"got {hasher.hexdigest()}, expected {digest}"
            )
        arrays[name] = array[..., None].astype(np.uint8) if is_images else array.astype(np.int64)
    for split in ("train", "test"):
        labels = arrays[f"{split}_labels"]
        if len(arrays[f"{split}_images"]) != len(labels):
            raise IdxError(f"{paths[0].parent}: {split} images and labels differ in count")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(spec.class_names)):
            raise IdxError(f"{paths[0].parent}: {split} labels outside 0..{len(spec.class_names) - 1}")
    cache.save_arrays(cache_dir, spec.name, key, arrays)
    return arrays
