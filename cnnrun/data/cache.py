"""Where dataset files live on disk, and the cache of decoded arrays that makes every load after the first fast.

Raw files (downloads) go to ``dataset.root`` when it is set, else ``$CNNRUN_DATA_DIR/<name>``, else
``$XDG_CACHE_HOME/cnnrun/datasets/<name>`` (``~/.cache/cnnrun/datasets/<name>``). Decoded arrays are saved as
``.npy`` files whose names carry a key made from the raw files' names, sizes and modification times, so a
changed raw file simply misses the cache; nothing ever has to be invalidated by hand. Cached arrays are opened
memory-mapped (read-only): loading costs no RAM, and batches read only their own rows (see
:mod:`cnnrun.data.rows`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

ENV_VAR = "CNNRUN_DATA_DIR"
_FORMAT = 1  # bump when the decoded layout changes, so old caches are ignored


def data_home() -> Path:
    """The folder that holds one sub-folder per dataset: $CNNRUN_DATA_DIR, else the user's cache folder."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cnnrun" / "datasets"


def data_dir(cfg, name: str) -> Path:
    """Where dataset ``name``'s files are looked for and downloaded to: dataset.root, else data_home()/name."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    return data_home() / name


def file_entries(paths: Iterable[Path], base: Optional[Path] = None) -> list:
    """(name, size, mtime_ns) for each file: what a cache key is made of (names relative to ``base``)."""
    entries = []
    for path in paths:
        st = path.stat()
        name = path.relative_to(base).as_posix() if base else path.name
        entries.append((name, st.st_size, st.st_mtime_ns))
    return entries


def cache_key(entries: Sequence[Tuple], *extra) -> str:
    """A short hash of the raw files' identities and any decoding options that change the result."""
    text = json.dumps([_FORMAT, list(entries), list(extra)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def create_temp(final: Path) -> Tuple[int, Path]:
    """A new, exclusive temp file beside ``final`` (hidden, ``.part``), honouring the umask unlike mkstemp.

    Writers fill it, then ``os.replace`` it onto ``final``: readers see the old file or the whole new one.
    """
    while True:
        tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def _array_path(directory: Path, stem: str, key: str, name: str) -> Path:
    return directory / f"{stem}-{key}.{name}.npy"


def load_arrays(directory: Path, stem: str, key: str, names: Sequence[str]) -> Optional[Dict[str, np.ndarray]]:
    """The arrays saved under ``key``, or None when any is missing or unreadable (a miss, never an error)."""
    arrays = {}
    for name in names:
        try:
            arrays[name] = np.load(_array_path(directory, stem, key, name), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
    return arrays


class MappedWriter:
    """A new ``.npy`` array of ``shape`` filled in place through a memory map, then committed under ``key``.

    For decoding more images than fit in RAM: rows are written into the map (and released from this process),
    and :meth:`commit` renames the finished file into the cache. Use it as a context manager: an exception
    before the commit removes the half-written file.
    """

    def __init__(self, directory: Path, stem: str, key: str, name: str, shape: Tuple[int, ...], dtype) -> None:
        self.directory, self.stem, self.key = directory, stem, key
        self.final = _array_path(directory, stem, key, name)
        directory.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = create_temp(self.final)
        os.close(fd)
        try:
            self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
            _reserve(Path(self.tmp))
        except BaseException:
            self.array = None
            _unlink(Path(self.tmp))
            raise

    def __enter__(self) -> "MappedWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.array = None
            _unlink(Path(self.tmp))

    def commit(self) -> np.ndarray:
        """Flush, rename into the cache, drop this stem's arrays under other keys; the array, re-opened read-only."""
        self.array.flush()
        self.array = None
        os.replace(self.tmp, self.final)
        for old in self.directory.glob(f"{self.stem}-*.npy"):
            if old.name != self.final.name:
                _unlink(old)
        return np.load(self.final, mmap_mode="r", allow_pickle=False)


def _reserve(path: Path) -> None:
    """Allocate the (sparse) file's blocks now: a full disk is then an OSError here, not a SIGBUS on a write
    through the map halfway through decoding."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise
            # a file system without fallocate: writes go through the map as they would anyway


def save_arrays(directory: Path, stem: str, key: str, arrays: Dict[str, np.ndarray]) -> bool:
    """Save each array atomically under ``key`` and drop this stem's arrays saved under other keys.

    Returns False when the folder is not writable: the data still loads, just without the speed-up next time.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            final = _array_path(directory, stem, key, name)
            fd, tmp = create_temp(final)
            try:
                with os.fdopen(fd, "wb") as out:
                    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
                os.replace(tmp, final)
            except BaseException:
                _unlink(Path(tmp))
                raise
    except OSError:
        return False
    keep = {_array_path(directory, stem, key, name).name for name in arrays}
    for old in directory.glob(f"{stem}-*.npy"):
        if old.name not in keep:
            _unlink(old)
    return True


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
