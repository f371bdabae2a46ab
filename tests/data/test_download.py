"""The downloader against a real HTTP server on 127.0.0.1: mirrors, checksums, truncation, caching, offline.

Only the dataset modules' mirror and checksum tables are pointed at the local server; the download code
itself runs unmodified.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from cnnrun.data import cifar10, download, fashion_mnist, load_dataset, mnist
from cnnrun.errors import UserError


@pytest.fixture
def tables(monkeypatch, idx_set):
    """Point mnist's tables at files generated for the test; return a setter for the mirror list."""
    monkeypatch.setattr(mnist, "FILES", idx_set.files())
    monkeypatch.setattr(mnist, "CONTENT_SHA256", idx_set.content_sha256())

    def mirrors(*urls: str) -> None:
        monkeypatch.setattr(mnist, "MIRRORS", tuple(urls))

    return mirrors


def _leftovers(directory: Path):
    return sorted(p.name for p in directory.glob(".*.part")) if directory.exists() else []


def test_download_verifies_and_caches(server, idx_set, tables, make_cfg, tmp_path):
    tables(server.serve("mirror", idx_set.gz))
    root = tmp_path / "mnist"
    ds = load_dataset(make_cfg("mnist", root=str(root)))
    assert ds.split_sizes() == {"train": 50, "val": 10, "test": 20}  # 6 per class: 1 to val
    assert ds.train.images.shape[1:] == (28, 28, 1) and ds.train.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.test.images[..., 0], idx_set.test_images)
    assert server.url("mirror") in ds.source
    for name, data in idx_set.gz.items():
        assert (root / name).read_bytes() == data
        assert (root / (name + ".verified")).is_file()
    assert not _leftovers(root)
    hits = len(server.hits)
    again = load_dataset(make_cfg("mnist", root=str(root), download=False))
    assert len(server.hits) == hits  # the cache answered
    assert again.digest() == ds.digest()


def test_wrong_checksum_is_refused_and_not_kept(server, idx_set, tables, make_cfg, tmp_path):
    served = dict(idx_set.gz)
    served["t10k-labels-idx1-ubyte.gz"] = b"tampered" + served["t10k-labels-idx1-ubyte.gz"]
    tables(server.serve("mirror", served))
    root = tmp_path / "mnist"
    with pytest.raises(UserError) as err:
        load_dataset(make_cfg("mnist", root=str(root)))
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value) and "sha256 mismatch" in str(err.value)
    assert not (root / "t10k-labels-idx1-ubyte.gz").exists()
    assert not _leftovers(root)


def test_truncated_download_is_detected_and_next_mirror_used(server, idx_set, tables, make_cfg, tmp_path):
    server.serve("good", idx_set.gz)
    for name, data in idx_set.gz.items():
        server.routes[f"/bad/{name}"] = (data, "truncate")
    tables(server.url("bad"), server.url("good"))
    root = tmp_path / "mnist"
    ds = load_dataset(make_cfg("mnist", root=str(root)))
    assert len(ds.test) == 20
    assert any(h.startswith("/bad/") for h in server.hits) and any(h.startswith("/good/") for h in server.hits)
    assert all((root / n).read_bytes() == d for n, d in idx_set.gz.items())


def test_truncated_download_alone_fails_cleanly(server, idx_set, tables, make_cfg, tmp_path):
    for name, data in idx_set.gz.items():
        server.routes[f"/bad/{name}"] = (data, "truncate")
    tables(server.url("bad"))
    root = tmp_path / "mnist"
    with pytest.raises(UserError, match="connection closed after"):
        load_dataset(make_cfg("mnist", root=str(root)))
    assert not any((root / n).exists() for n in idx_set.gz)
    assert not _leftovers(root)


def test_404_on_first_mirror_then_second(server, idx_set, tables, make_cfg, tmp_path):
    tables(server.url("missing"), server.serve("second", idx_set.gz))
    ds = load_dataset(make_cfg("mnist", root=str(tmp_path / "mnist")))
    assert len(ds.train) + len(ds.val) == 60
    assert "/missing/train-images-idx3-ubyte.gz" in server.hits


def test_all_mirrors_failing_lists_every_place(server, idx_set, tables, make_cfg, tmp_path, closed_port_url):
    tables(server.url("missing"), closed_port_url)
    root = tmp_path / "mnist"
    with pytest.raises(UserError) as err:
        load_dataset(make_cfg("mnist", root=str(root)))
    text = str(err.value)
    for name in idx_set.gz:
        assert f"{server.url('missing')}{name}: HTTP 404" in text
        assert f"{closed_port_url}{name}: " in text
        assert str(root / name) in text
    assert "dataset.root=" in text and "dataset=mnist_5k" in text


def test_corrupt_cached_file_is_fetched_again(server, idx_set, tables, make_cfg, tmp_path):
    tables(server.serve("mirror", idx_set.gz))
    root = idx_set.write(tmp_path / "mnist")
    name = "train-images-idx3-ubyte.gz"
    good = (root / name).read_bytes()
    (root / name).write_bytes(good[: len(good) // 2])  # a download that died half-way, under the real name
    ds = load_dataset(make_cfg("mnist", root=str(root)))
    assert (root / name).read_bytes() == good
    assert server.hits == [f"/mirror/{name}"]  # only the bad file was fetched
    assert len(ds.train) == 50


def test_corrupt_cached_file_offline_is_an_error(idx_set, tables, make_cfg, tmp_path):
    tables("http://127.0.0.1:9/never/")
    root = idx_set.write(tmp_path / "mnist")
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: not a valid gzip file"):
        load_dataset(make_cfg("mnist", root=str(root), download=False))


def test_download_false_with_nothing_cached(server, idx_set, tables, make_cfg, tmp_path):
    tables(server.serve("mirror", idx_set.gz))
    with pytest.raises(UserError) as err:
        load_dataset(make_cfg("mnist", root=str(tmp_path / "nothing"), download=False))
    text = str(err.value)
    assert "download=false" in text and str(tmp_path / "nothing") in text and "dataset=mnist_5k" in text
    assert server.hits == []


def test_default_cache_dir_comes_from_env(server, idx_set, tables, make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNRUN_DATA_DIR", str(tmp_path / "home"))
    tables(server.serve("mirror", idx_set.gz))
    load_dataset(make_cfg("mnist"))
    assert (tmp_path / "home" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


def test_recompressed_copy_in_a_system_dir_is_used_offline(idx_set, make_cfg, tmp_path, monkeypatch):
    # Debian ships Fashion-MNIST recompressed: other gz bytes, same content. That must be accepted.
    system = idx_set.write(tmp_path / "usr-share", recompress=True)
    monkeypatch.setattr(fashion_mnist, "FILES", idx_set.files())
    monkeypatch.setattr(fashion_mnist, "CONTENT_SHA256", idx_set.content_sha256())
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (str(system),))
    ds = load_dataset(make_cfg("fashion_mnist", download=False))
    assert ds.source == str(system) and ds.class_names[0] == "T-shirt/top"
    (system / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05"))
    with pytest.raises(UserError, match="content sha256 mismatch"):
        load_dataset(make_cfg("fashion_mnist", download=False))


def test_verification_record_skips_rehash_until_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    checksum = download.Checksum("sha256", download.hash_file(path, "sha256"))
    record = download.sidecar(path)
    assert download.verify(path, checksum, record) is None and record.is_file()
    calls = []
    real = download.hash_file
    monkeypatch.setattr(download, "hash_file", lambda p, a: calls.append(p) or real(p, a))
    assert download.verify(path, checksum, record) is None
    assert calls == []  # trusted from the record
    path.write_bytes(b"abd" * 1000)
    os.utime(path, ns=(1, 1))
    assert "mismatch" in download.verify(path, checksum, record)
    assert calls == [path]


def test_md5_checksums_work_too(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    assert download.verify(path, download.Checksum("md5", "5d41402abc4b2a76b9719d911017c592")) is None
    assert "md5 mismatch" in download.verify(path, download.Checksum("md5", "0" * 32))


def test_cifar_tarball_downloads(server, helpers, make_cfg, tmp_path, monkeypatch):
    tarball = helpers.cifar_tarball(per_batch=20)
    url = server.serve("kriz", {"cifar-10-python.tar.gz": tarball})
    monkeypatch.setattr(cifar10, "MIRRORS", (server.url("gone"), url))
    checksum = download.Checksum("sha256", helpers.sha256(tarball))
    monkeypatch.setattr(cifar10, "ARCHIVE", download.RemoteFile("cifar-10-python.tar.gz", checksum))
    ds = load_dataset(make_cfg("cifar10", root=str(tmp_path / "c10")))
    assert ds.split_sizes() == {"train": 90, "val": 10, "test": 20}
    assert ds.class_names == tuple(helpers.CIFAR_CLASSES)
    assert url in ds.source


def test_corrupt_decoded_cache_is_rebuilt(idx_set, tables, make_cfg, tmp_path):
    tables("http://127.0.0.1:9/never/")
    root = idx_set.write(tmp_path / "mnist")
    cfg = make_cfg("mnist", root=str(root), download=False)
    first = load_dataset(cfg)
    (npy,) = root.glob("mnist-*.train_images.npy")
    npy.write_bytes(npy.read_bytes()[:200])  # a cache file cut short
    assert load_dataset(cfg).digest() == first.digest()
    assert npy.stat().st_size > 200
    (root / "t10k-labels-idx1-ubyte.gz").touch()  # a changed raw file: new key, old arrays dropped
    load_dataset(cfg)
    assert len(list(root.glob("mnist-*.npy"))) == 4
