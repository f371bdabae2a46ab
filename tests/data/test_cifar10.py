"""CIFAR-10 from a generated tarball: decoding, caching, and refusing hostile pickles and archive members."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from cnnrun.data import cifar10, download, load_dataset
from cnnrun.errors import UserError


class _RunsShell:
    """Unpickling this calls os.system: what a hostile 'batch' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _use_tarball(monkeypatch, tmp_path, data: bytes):
    """Put ``data`` where cifar10 looks, with the checksum table pointing at it (nothing else is patched)."""
    root = tmp_path / "cifar"
    root.mkdir(exist_ok=True)
    (root / "cifar-10-python.tar.gz").write_bytes(data)
    checksum = download.Checksum("sha256", download.hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(cifar10, "ARCHIVE", download.RemoteFile("cifar-10-python.tar.gz", checksum))
    monkeypatch.setattr(cifar10, "MIRRORS", ())
    return root


def test_decode_archive_layout(tmp_path, helpers):
    path = tmp_path / "c.tar.gz"
    path.write_bytes(helpers.cifar_tarball(per_batch=10))
    arrays = cifar10.decode_archive(path)
    assert arrays["train_images"].shape == (50, 32, 32, 3) and arrays["train_images"].dtype == np.uint8
    assert arrays["test_images"].shape == (10, 32, 32, 3)
    assert arrays["train_labels"].dtype == np.int64
    _, images, labels = helpers.cifar_batch(10, 1)
    np.testing.assert_array_equal(arrays["train_images"][:10], images)
    np.testing.assert_array_equal(arrays["train_labels"][:10], labels)
    # channel planes became the last axis: pixel (row 0, col 1) of image 0 is bytes 1, 1025, 2049 of its row
    _, raw_images, _ = helpers.cifar_batch(10, 99)
    assert list(arrays["test_images"][0, 0, 1]) == list(raw_images[0, 0, 1])
    assert list(arrays["class_names"]) == helpers.CIFAR_CLASSES


def test_load_from_root_then_from_cache(tmp_path, helpers, monkeypatch, make_cfg):
    root = _use_tarball(monkeypatch, tmp_path, helpers.cifar_tarball(per_batch=20))
    cfg = make_cfg("cifar10", root=str(root), download=False)
    ds = load_dataset(cfg)
    assert ds.split_sizes() == {"train": 90, "val": 10, "test": 20}
    assert ds.input_shape == (3, 32, 32) and len(ds.mean) == 3
    assert list(root.glob("cifar10-*.train_images.npy"))
    monkeypatch.setattr(cifar10, "decode_archive", lambda path: pytest.fail("decoded again despite the cache"))
    assert load_dataset(cfg).digest() == ds.digest()


def test_malicious_pickle_is_refused(tmp_path, monkeypatch, make_cfg, helpers):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsShell(marker), protocol=2)
    root = _use_tarball(monkeypatch, tmp_path, helpers.cifar_tarball(replace={"data_batch_3": evil}))
    with pytest.raises(UserError) as err:
        load_dataset(make_cfg("cifar10", root=str(root), download=False))
    assert "data_batch_3" in str(err.value) and "refused to load global" in str(err.value)
    assert "system" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_unpickle_refuses_any_other_global(tmp_path, protocol):
    marker = tmp_path / "pwned"
    with pytest.raises(UserError, match="refused to load global"):
        cifar10.safe_unpickle(pickle.dumps(_RunsShell(marker), protocol=protocol), "x")
    with pytest.raises(UserError, match="refused to load global"):
        cifar10.safe_unpickle(pickle.dumps({"f": io.BytesIO}, protocol=protocol), "x")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_unpickle_accepts_numpy_batches(protocol):
    batch = {"data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072), "labels": [3, 4]}
    out = cifar10.safe_unpickle(pickle.dumps(batch, protocol=protocol), "x")
    np.testing.assert_array_equal(out["data"], batch["data"])


def test_object_arrays_are_not_accepted_as_data(tmp_path, helpers):
    batch = {"data": np.array([[1, 2]], dtype=object), "labels": [1]}
    path = tmp_path / "c.tar.gz"
    path.write_bytes(helpers.cifar_tarball(replace={"test_batch": pickle.dumps(batch, protocol=2)}))
    with pytest.raises(UserError, match="uint8 array"):
        cifar10.decode_archive(path)


def test_path_traversal_members_are_never_written(tmp_path, helpers, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    for name in ("../escaped", "/tmp/absolute-escape-cnnrun", "cifar-10-batches-py/../../escaped2"):
        info = tarfile.TarInfo(name)
        info.size = 3
        extra.append(info)
    path = tmp_path / "c.tar.gz"
    path.write_bytes(helpers.cifar_tarball(per_batch=10, extra=extra))
    arrays = cifar10.decode_archive(path)  # the hostile members are ignored, not extracted
    assert len(arrays["train_images"]) == 50
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path.parent / "escaped2").exists()
    assert not os.path.exists("/tmp/absolute-escape-cnnrun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tar.gz"]


def test_a_link_in_place_of_a_batch_is_refused(tmp_path, helpers):
    link = tarfile.TarInfo("cifar-10-batches-py/test_batch")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(link)
    path = tmp_path / "c.tar.gz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UserError, match="not a regular file"):
        cifar10.decode_archive(path)


def test_missing_members_and_junk_files(tmp_path):
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w:gz"):
        pass
    path = tmp_path / "c.tar.gz"
    path.write_bytes(empty.getvalue())
    with pytest.raises(UserError, match="no cifar-10-batches-py/data_batch_1"):
        cifar10.decode_archive(path)
    path.write_bytes(b"not a tarball at all")
    with pytest.raises(UserError, match="not a readable tar.gz"):
        cifar10.decode_archive(path)


def test_wrong_checksum_in_root_offline(tmp_path, helpers, monkeypatch, make_cfg):
    root = _use_tarball(monkeypatch, tmp_path, helpers.cifar_tarball())
    (root / "cifar-10-python.tar.gz").write_bytes(b"truncated")
    with pytest.raises(UserError) as err:
        load_dataset(make_cfg("cifar10", root=str(root), download=False))
    assert "sha256 mismatch" in str(err.value) and "download=false" in str(err.value)


def test_shape_mismatch_in_config(make_cfg):
    with pytest.raises(UserError, match=r"dataset.channels=3 dataset.image_size=\[32,32\]"):
        load_dataset(make_cfg("cifar10", channels=1))


def test_only_the_latin1_codec_is_allowed():
    sneaky = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    with pytest.raises(UserError, match="refused codec"):
        cifar10.safe_unpickle(sneaky, "x")
    fine = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00latin1\x86R."
    assert cifar10.safe_unpickle(fine, "x") == b"abc"
