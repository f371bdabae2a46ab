"""A strict reader for IDX files (the MNIST format), gzipped or plain.

Layout: two zero bytes, a type code, the number of dimensions, then each dimension as a big-endian uint32,
then the values, big-endian, row-major. Everything is checked against the header, and the data are streamed
so a corrupt or hostile header can't make the reader allocate more than the header's own promise.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import numpy as np

from cnnrun.errors import UserError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_BYTES = 1 << 31  # the largest payload accepted; the biggest real IDX file is ~47 MB
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(UserError):
    """An IDX file that isn't one, or doesn't hold what it should."""


def read_idx(
    path: Path,
    ndim: Optional[int] = None,
    shape_tail: Sequence[int] = (),
    hasher=None,
) -> np.ndarray:
    """Read an IDX file (gzip detected by its magic bytes, not its name) into a native-endian array.

    ``ndim`` and ``shape_tail`` (e.g. (28, 28)) are what the caller expects; a mismatch is an IdxError.
    ``hasher`` (a hashlib object), when given, is fed every decompressed byte, for content checksums.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _parse(stream, path, ndim, tuple(shape_tail), hasher)
            return _parse(raw, path, ndim, tuple(shape_tail), hasher)
    except IdxError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise IdxError(f"{path}: not a valid gzip file ({err or 'truncated'}); delete it and fetch it again") from None
    except OSError as err:
        raise IdxError(f"{path}: cannot read ({err.strerror or err})") from None


def _parse(stream: BinaryIO, path: Path, ndim, shape_tail, hasher) -> np.ndarray:
    def take(n: int, what: str) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise IdxError(f"{path}: truncated IDX file: {what} needs {n:,} bytes, found {len(data):,}")
        if hasher is not None:
            hasher.update(data)
        return data

    magic = take(4, "the header")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
        raise IdxError(f"{path}: not an IDX file (magic bytes {magic.hex()}; expected 0000 then a type code)")
    dtype = np.dtype(_DTYPES[magic[2]])
    rank = magic[3]
    if rank == 0 or (ndim is not None and rank != ndim):
        want = f"{ndim}" if ndim is not None else "at least 1"
        raise IdxError(f"{path}: IDX file has {rank} dimensions, expected {want}")
    shape = struct.unpack(f">{rank}I", take(4 * rank, "the dimensions"))
    if shape_tail and tuple(shape[-len(shape_tail):]) != tuple(shape_tail):
        raise IdxError(f"{path}: IDX items are {shape[1:]}, expected {tuple(shape_tail)}")
    size = math.prod(shape) * dtype.itemsize  # Python ints: a hostile header can't overflow this
    if size > MAX_BYTES:
        raise IdxError(f"{path}: IDX header promises {size:,} bytes, more than any dataset this reads")
    body = take(size, f"shape {shape}")
    extra = stream.read(1)
    if extra:
        raise IdxError(f"{path}: IDX file has data after the {size:,} bytes its header announces")
    array = np.frombuffer(body, dtype=dtype).reshape(shape)
    return array if dtype.byteorder in ("=", "|") else array.astype(dtype.newbyteorder("="))
