"""Images that are read a batch at a time: selected rows of a memory-mapped array, without copying them into RAM.

A split of a dataset too large for memory is a :class:`Rows`: the decoded array on disk (``np.load(...,
mmap_mode="r")``) and the indices of the split's images in it. Reading a batch gathers those rows from the map
and then drops the pages from this process (``madvise(MADV_DONTNEED)``): the data stays in the OS page cache,
where it is shared and reclaimable, but the process's resident memory stays the size of a few batches however
large the dataset is. Anything that reads every image (channel statistics, the content digest) goes through
:func:`chunks`, which does the same a few thousand rows at a time.
"""

from __future__ import annotations

import mmap
from typing import Iterator, Optional, Tuple

import numpy as np

CHUNK_BYTES = 32 << 20  # read at once by whole-split passes (statistics, digest): a bounded slice of any dataset


def release(array) -> None:
    """Drop the pages of ``array``'s memory map from this process (no-op for an in-memory array).

    A read-only shared map is backed by the file: the pages stay in the page cache and fault back in on the
    next read, so this only stops them counting as (and staying) this process's memory.
    """
    mapped = getattr(array, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed, or a platform without it: only memory is at stake
            pass


class Rows:
    """Rows ``index`` of ``source`` (an (N, H, W, C) array or memory map), read on demand.

    Enough of NumPy's interface for the places that handle a split's images (``shape``, ``dtype``, ``ndim``,
    ``len``, slicing, ``take``, ``np.asarray``), so the trainer and evaluation treat it like an array.
    """

    def __init__(self, source, index: Optional[np.ndarray] = None):
        self.source = source
        self.index = None if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.source) if self.index is None else len(self.index)

    @property
    def shape(self):
        return (len(self), *self.source.shape[1:])

    @property
    def dtype(self):
        return self.source.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def take(self, idx, axis: int = 0) -> np.ndarray:
        """The images at positions ``idx`` of this split, as a new in-memory array."""
        if axis != 0:
            raise ValueError("Rows.take gathers whole images (axis=0)")
        idx = np.asarray(idx, dtype=np.int64)
        positions = idx if self.index is None else self.index[idx]
        return self._gather(positions)

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        if hasattr(self.source, "rows"):  # a source that reads files on demand (dataset.cache=false)
            return self.source.rows(positions)
        # Sorted reads walk the file forwards (the page cache reads ahead); then put them back in order.
        sort = np.argsort(positions, kind="stable")
        out = np.empty((len(positions), *self.source.shape[1:]), self.source.dtype)
        out[sort] = self.source[positions[sort]]
        release(self.source)
        return out

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([key]))[0]
        key = np.asarray(key)
        return self.take(np.flatnonzero(key) if key.dtype == bool else key)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.take(np.arange(len(self)))
        return array if dtype is None else array.astype(dtype)


def chunks(images, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The images about ``max_bytes`` at a time, pages released after each: for passes over a whole split."""
    return (chunk for _, chunk in row_chunks(images, max_bytes))


def row_chunks(images, max_bytes: int = CHUNK_BYTES) -> Iterator[Tuple[slice, np.ndarray]]:
    """(the rows it holds, chunk) for each chunk of :func:`chunks`: for copying a whole split into place."""
    row_bytes = max(1, int(np.prod(images.shape[1:], dtype=np.int64)) * np.dtype(images.dtype).itemsize)
    rows = max(1, max_bytes // row_bytes)
    for start in range(0, len(images), rows):
        chunk = np.asarray(images[start : start + rows])
        yield slice(start, start + len(chunk)), chunk
        release(images)


def mapped_rows(array, index: Optional[np.ndarray] = None):
    """``array[index]`` for an in-memory array (a copy, as before); a :class:`Rows` view for a memory map."""
    if isinstance(array, np.memmap) or hasattr(array, "rows"):
        return Rows(array, index)
    return array if index is None else array[index]
