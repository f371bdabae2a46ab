"""Fixtures for the data tests: small generated IDX and CIFAR files, and a real HTTP server on 127.0.0.1.

Nothing here touches the network or the user's cache: CNNRUN_DATA_DIR points into the test's tmp_path and
proxies are switched off for the local server.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest

from cnnrun.config import DatasetConfig
from cnnrun.data.download import Checksum, RemoteFile

IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (uncompressed) holding ``array``."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    head = bytes([0, 0, codes[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + big.tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class IdxSet:
    """Four small MNIST-format files: ``gz`` (name → bytes as served), ``plain`` (content), arrays."""

    def __init__(self, train_per_class: int = 6, test_per_class: int = 2, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.train_labels = np.repeat(np.arange(10, dtype=np.uint8), train_per_class)
        self.test_labels = np.repeat(np.arange(10, dtype=np.uint8), test_per_class)
        self.train_images = rng.integers(0, 256, (len(self.train_labels), 28, 28), dtype=np.uint8)
        self.test_images = rng.integers(0, 256, (len(self.test_labels), 28, 28), dtype=np.uint8)
        arrays = (self.train_images, self.train_labels, self.test_images, self.test_labels)
        self.plain = {name: idx_bytes(a) for name, a in zip(IDX_NAMES, arrays)}
        self.gz = {name: gzip.compress(data, mtime=0) for name, data in self.plain.items()}

    def files(self) -> Tuple[RemoteFile, ...]:
        """The module-level FILES table for these files."""
        return tuple(RemoteFile(name, Checksum("sha256", sha256(self.gz[name]))) for name in IDX_NAMES)

    def content_sha256(self) -> Tuple[str, ...]:
        return tuple(sha256(self.plain[name]) for name in IDX_NAMES)

    def write(self, directory: Path, recompress: bool = False) -> Path:
        """Put the four files in ``directory`` (recompressed: same content, different gz bytes, like Debian's)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in IDX_NAMES:
            data = gzip.compress(self.plain[name], compresslevel=1, mtime=12345) if recompress else self.gz[name]
            (directory / name).write_bytes(data)
        return directory


def cifar_batch(n: int, seed: int, protocol: int = 2) -> Tuple[bytes, np.ndarray, np.ndarray]:
    """A pickled CIFAR-format batch of ``n`` images (labels cycle 0..9); returns (bytes, images NHWC, labels)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [i % 10 for i in range(n)]
    names = [f"{i}.png" for i in range(n)]
    batch = {"batch_label": f"batch {seed}", "labels": labels, "data": data, "filenames": names}
    images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return pickle.dumps(batch, protocol=protocol), images, np.array(labels)


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_tarball(
    per_batch: int = 20, replace: Optional[Dict[str, bytes]] = None, extra: List[tarfile.TarInfo] = ()
) -> bytes:
    """A cifar-10-python.tar.gz in the official layout; ``replace`` swaps a member's bytes, ``extra`` adds members."""
    members = {f"data_batch_{i}": cifar_batch(per_batch, i)[0] for i in range(1, 6)}
    members["test_batch"] = cifar_batch(per_batch, 99)[0]
    members["batches.meta"] = pickle.dumps({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, protocol=2)
    members["readme.html"] = b"<html></html>"
    members.update(replace or {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buf.getvalue()


class Server:
    """A real HTTP server: ``routes`` maps a path to bytes, or to (bytes, 'truncate') to die half-way."""

    def __init__(self) -> None:
        self.routes: Dict[str, object] = {}
        self.hits: List[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.hits.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                body, mode = route if isinstance(route, tuple) else (route, "ok")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":  # promise the whole body, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.port}/{prefix.strip('/')}/"

    def serve(self, prefix: str, files: Dict[str, bytes]) -> str:
        for name, data in files.items():
            self.routes[f"/{prefix}/{name}"] = data
        return self.url(prefix)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path) -> None:
    """Keep every test off the user's cache and off any proxy."""
    monkeypatch.setenv("CNNRUN_DATA_DIR", str(tmp_path / "data-home"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on a port nothing listens on: connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing/"


@pytest.fixture
def idx_set() -> IdxSet:
    return IdxSet()


@pytest.fixture
def make_cfg():
    """DatasetConfig for a dataset name with the right shape defaults, overridable."""
    shapes = {"mnist": (1, (28, 28)), "fashion_mnist": (1, (28, 28)), "cifar10": (3, (32, 32)), "folder": (3, (8, 8))}

    def make(name: str, **overrides) -> DatasetConfig:
        channels, size = shapes[name]
        values = dict(name=name, num_classes=10, channels=channels, image_size=size, download=True)
        values.update(overrides)
        return DatasetConfig(**values)

    return make


@pytest.fixture
def helpers():
    """The generators above, for tests that build their own files."""

    return SimpleNamespace(
        idx_bytes=idx_bytes, sha256=sha256, IdxSet=IdxSet, cifar_batch=cifar_batch, cifar_tarball=cifar_tarball,
        CIFAR_CLASSES=CIFAR_CLASSES, IDX_NAMES=IDX_NAMES,
    )
