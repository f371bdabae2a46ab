"""Get a published file onto disk, verified: from the cache when its checksum holds, else from mirrors in order.

A download streams into a temporary file in the destination folder, is checked against its published
checksum and only then ``os.replace``-d into place, so a half-written, truncated or tampered file never sits
under the real name. A verified file gets a small ``<file>.verified`` record (size, mtime, digest) so the next
run trusts it without rehashing; any change to the file's size or mtime voids the record.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from cnnrun import __version__
from cnnrun.data.cache import create_temp
from cnnrun.errors import UserError

TIMEOUT_S = 30.0  # per connect and per read: a stalled mirror is abandoned, not waited on forever
MAX_BYTES = 1 << 30  # no dataset file here is near 1 GiB; a mirror sending more is broken or hostile
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Checksum:
    algo: str  # "sha256", or "md5" where only that is published
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algo} {self.hexdigest}"


@dataclass(frozen=True)
class RemoteFile:
    name: str  # the file name on every mirror and on disk
    checksum: Checksum


@dataclass
class Fetched:
    """Verified local paths by file name, and the URL each freshly downloaded file came from."""

    paths: Dict[str, Path] = field(default_factory=dict)
    urls: Dict[str, str] = field(default_factory=dict)


class FetchFailed(Exception):
    """Every mirror failed for one file; ``attempts`` holds (url, reason) for each."""

    def __init__(self, attempts: List[Tuple[str, str]]):
        self.attempts = attempts
        super().__init__("; ".join(f"{url}: {why}" for url, why in attempts))


class _MirrorError(Exception):
    pass


def sidecar(path: Path) -> Path:
    """The verification record kept next to a file."""
    return path.with_name(path.name + ".verified")


def hash_file(path: Path, algo: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, checksum: Checksum, record: Optional[Path] = None) -> Optional[str]:
    """None when ``path`` matches ``checksum``, else why not ('not there', 'sha256 mismatch ...').

    With ``record``, a matching record (same size, mtime and expected digest) skips the hashing, and a fresh
    match is recorded there.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return "not there"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    stamp = _stamp(checksum, st)
    if record is not None and _read_record(record) == stamp:
        return None
    try:
        actual = hash_file(path, checksum.algo)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if actual != checksum.hexdigest:
        return f"{checksum.algo} mismatch (corrupt or incomplete): got {actual}, expected {checksum.hexdigest}"
    if record is not None:
        _write_record(record, stamp)
    return None


def fetch(file: RemoteFile, mirrors: Sequence[str], dest_dir: Path) -> Tuple[Path, str]:
    """Download ``file`` from the first mirror that serves it intact; return (path, url).

    Raises FetchFailed listing each URL tried and what went wrong there.
    """
    attempts: List[Tuple[str, str]] = []
    final = dest_dir / file.name
    for base in mirrors:
        url = base.rstrip("/") + "/" + file.name
        _say(f"downloading {file.name} from {url}")
        try:
            tmp = _download(url, dest_dir, file)
        except _MirrorError as err:
            attempts.append((url, str(err)))
            _say(f"  failed: {err}")
            continue
        try:
            os.replace(tmp, final)
        except OSError as err:
            _unlink(tmp)
            attempts.append((url, f"downloaded, but could not move it to {final} ({_reason(err)})"))
            continue
        _write_record(sidecar(final), _stamp(file.checksum, final.stat()))
        return final, url
    raise FetchFailed(attempts)


def ensure_files(
    files: Sequence[RemoteFile],
    mirrors: Sequence[str],
    dest_dir: Path,
    *,
    download: bool,
    dataset: str,
    looked: Iterable[str] = (),
) -> Fetched:
    """Every file in ``dest_dir``, verified; missing or corrupt ones downloaded when ``download`` allows.

    Raises the UserError of :func:`no_data_error` when any file is still missing, listing ``looked`` (places
    the caller already searched) and every path and URL tried here.
    """
    result = Fetched()
    problems: Dict[str, List[str]] = {}
    for file in files:
        path = dest_dir / file.name
        why = verify(path, file.checksum, sidecar(path))
        if why is None:
            result.paths[file.name] = path
        else:
            problems[file.name] = [f"{path}: {why}"]
    if problems and download:
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(dest_dir, os.W_OK)
        except OSError as err:
            writable, reason = False, err.strerror
        else:
            reason = "permission denied"
        if not writable:
            problems.setdefault("", []).append(f"{dest_dir}: cannot write there ({reason}) to download into")
        for file in files:
            if file.name not in problems or not writable:
                continue
            try:
                result.paths[file.name], result.urls[file.name] = fetch(file, mirrors, dest_dir)
                del problems[file.name]
            except FetchFailed as err:
                problems[file.name] += [f"{url}: {why}" for url, why in err.attempts]
    missing = [f.name for f in files if f.name not in result.paths]
    if missing:
        lines = list(looked) + [line for lines in problems.values() for line in lines]
        raise no_data_error(dataset, missing, lines, download)
    return result


def no_data_error(dataset: str, missing: Sequence[str], looked: Sequence[str], download: bool) -> UserError:
    """The one error a user sees when a dataset can't be had: what, every place looked, and the ways out."""
    head = f"dataset={dataset}: could not get {', '.join(missing)}"
    body = ["tried:"] + [f"  {line}" for line in looked]
    if not download:
        body.append("dataset.download=false, so the network was not tried")
    fix = (
        "fix: put the files in a folder and set dataset.root=PATH (or the CNNRUN_DATA_DIR env var)"
        + ("" if download else ", allow dataset.download=true")
        + ", or use the bundled offline digits with dataset=mnist_5k"
    )
    return UserError("\n".join([head] + body + [fix]))


def _download(url: str, dest_dir: Path, file: RemoteFile) -> Path:
    """Stream ``url`` into a temp file in ``dest_dir``; return it only when complete and matching its checksum."""
    if not url.startswith(("https://", "http://")):
        raise _MirrorError("only http(s) mirrors are used")
    try:
        fd, tmp = create_temp(dest_dir / file.name)
    except OSError as err:
        raise _MirrorError(f"cannot write into {dest_dir} ({_reason(err)})") from None
    try:
        h = hashlib.new(file.checksum.algo)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": f"cnnrun/{__version__}"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > MAX_BYTES:
                    raise _MirrorError(f"sent more than {MAX_BYTES:,} bytes")
                h.update(chunk)
                out.write(chunk)
                _progress(received, expected)
            # http.client returns a short body without complaint when the server closes early: check ourselves
            if expected is not None and received != expected:
                raise _MirrorError(f"connection closed after {received:,} of {expected:,} bytes")
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != file.checksum.hexdigest:
            raise _MirrorError(
                f"{file.checksum.algo} mismatch: got {h.hexdigest()}, expected {file.checksum.hexdigest}"
            )
        return tmp
    except urllib.error.HTTPError as err:
        _unlink(tmp)
        raise _MirrorError(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        _unlink(tmp)
        raise _MirrorError(_reason(err.reason)) from None
    except (socket.timeout, TimeoutError):
        _unlink(tmp)
        raise _MirrorError(f"no response within {TIMEOUT_S:g} s") from None
    except (http.client.HTTPException, OSError) as err:
        _unlink(tmp)
        raise _MirrorError(_reason(err)) from None
    except BaseException:  # a checksum mismatch, Ctrl-C: the partial file must not survive
        _unlink(tmp)
        raise


def _reason(err) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _stamp(checksum: Checksum, st: os.stat_result) -> dict:
    """What a verification record holds: the file's identity and the digest it was checked against."""
    return {"algo": checksum.algo, "hexdigest": checksum.hexdigest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_record(record: Path) -> Optional[dict]:
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def _write_record(record: Path, stamp: dict) -> None:
    """Write a verification record atomically; a read-only folder only costs a rehash next time."""
    try:
        fd, tmp = create_temp(record)
        with os.fdopen(fd, "w") as out:
            json.dump(stamp, out)
        os.replace(tmp, record)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _say(message: str) -> None:
    print(f"cnnrun: {message}", file=sys.stderr, flush=True)


def _progress(received: int, expected: Optional[int]) -> None:
    """A one-line percentage on a terminal (CIFAR-10 is 170 MB); nothing in logs or under test."""
    if not expected or expected < 8 * _CHUNK or not sys.stderr.isatty():
        return
    line = f"\rcnnrun:   {received * 100 // expected:3d}% of {expected / 1e6:.0f} MB"
    print(line, end="\n" if received >= expected else "", file=sys.stderr, flush=True)
