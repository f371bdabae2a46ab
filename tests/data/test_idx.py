"""The IDX reader: round trips for every type, and a clear IdxError for each way a file can be wrong."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from cnnrun.data.idx import IdxError, read_idx
from cnnrun.errors import UserError


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, helpers, dtype, gz):
    array = (np.arange(2 * 3 * 4) - 5).astype(np.dtype(dtype).newbyteorder("=")).reshape(2, 3, 4)
    if dtype == "u1":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = helpers.idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path, ndim=3, shape_tail=(3, 4))
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative


def test_gzip_is_detected_by_content_not_name(tmp_path, helpers):
    path = tmp_path / "labels.idx"  # no .gz, but gzipped
    path.write_bytes(gzip.compress(helpers.idx_bytes(np.arange(5, dtype=np.uint8))))
    np.testing.assert_array_equal(read_idx(path), np.arange(5))


def test_hasher_sees_the_decompressed_content(tmp_path, helpers):
    data = helpers.idx_bytes(np.arange(100, dtype=np.uint8).reshape(10, 10))
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(data))
    h = hashlib.sha256()
    read_idx(path, hasher=h)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def _write(tmp_path, data: bytes, gz: bool = False):
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


GOOD = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(6)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "truncated IDX file: the header"),
        (b"\x00\x01\x08\x01" + bytes(8), "not an IDX file"),
        (b"\x00\x00\x07\x01" + bytes(8), "not an IDX file"),
        (bytes([0, 0, 8, 0]), "0 dimensions"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "the dimensions needs 8 bytes"),
        (GOOD[:-1], "truncated IDX file: shape (2, 3) needs 6 bytes, found 5"),
        (GOOD + b"\x00", "data after the 6 bytes"),
        (bytes([0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 9]), "promises"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_bad_files_give_clear_errors(tmp_path, data, message, gz):
    path = _write(tmp_path, data, gz)
    with pytest.raises(IdxError) as err:
        read_idx(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, UserError)


def test_expected_shape_is_enforced(tmp_path):
    path = _write(tmp_path, GOOD)
    assert read_idx(path, ndim=2, shape_tail=(3,)).shape == (2, 3)
    with pytest.raises(IdxError, match="2 dimensions, expected 3"):
        read_idx(path, ndim=3)
    with pytest.raises(IdxError, match=r"items are \(3,\), expected \(28, 28\)"):
        read_idx(path, shape_tail=(28, 28))


def test_broken_gzip(tmp_path):
    packed = gzip.compress(GOOD)
    truncated = _write(tmp_path, packed[:-6])
    with pytest.raises(IdxError, match="not a valid gzip file"):
        read_idx(truncated)
    crc = bytearray(packed)
    crc[-8] ^= 0xFF  # the CRC32 of the content
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(crc))
    with pytest.raises(IdxError, match="not a valid gzip file"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")
