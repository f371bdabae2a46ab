"""The portable checkpoint: one safetensors file that every backend writes and reads.

Tensors: the model's weights in canonical layout (:mod:`cnnrun.layout`) under their layer names, plus optional
``train/...`` tensors (optimizer slots) for resuming. Metadata (JSON strings): the resolved model spec, input
shape, classes, normalisation, framework of origin, training progress and a SHA-256 over all tensor bytes.
Loading never unpickles anything, and a truncated, tampered or foreign file is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from cnnrun.errors import UserError

FORMAT = "cnnrun-checkpoint"
VERSION = 1
TRAIN_PREFIX = "train/"


@dataclass
class Checkpoint:
    weights: Dict[str, np.ndarray]
    spec: Dict[str, Any]  # the resolved model spec
    input_shape: tuple
    class_names: tuple
    mean: tuple
    std: tuple
    origin: Dict[str, Any] = field(default_factory=dict)  # framework, version, run id, dataset
    progress: Dict[str, Any] = field(default_factory=dict)  # epoch, step, best metric, patience state
    training_state: Dict[str, np.ndarray] = field(default_factory=dict)
    # The dataset split trained on (cnnrun.data.split_record); {} in checkpoints written before it was stored.
    split: Dict[str, Any] = field(default_factory=dict)


def _digest(tensors: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).data)
    return h.hexdigest()


def save(path: os.PathLike, ckpt: Checkpoint) -> Path:
    """Write atomically: a temporary file in the same directory, fsync, then rename over ``path``. A folder or
    disk that refuses the file is a :class:`UserError` naming it; nothing partial is left behind."""
    from safetensors.numpy import save as to_bytes

    path = Path(path)
    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.weights.items()}
    tensors.update({TRAIN_PREFIX + k: np.ascontiguousarray(v) for k, v in ckpt.training_state.items()})
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spec": json.dumps(ckpt.spec),
        "input_shape": json.dumps(list(ckpt.input_shape)),
        "class_names": json.dumps(list(ckpt.class_names)),
        "mean": json.dumps(list(ckpt.mean)),
        "std": json.dumps(list(ckpt.std)),
        "origin": json.dumps(ckpt.origin),
        "progress": json.dumps(ckpt.progress),
        "split": json.dumps(ckpt.split),
        "sha256": _digest(tensors),
    }
    payload = to_bytes(tensors, metadata=meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _unwritable(path, err) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _unwritable(path, err) from None
        raise
    return path


def load_setting(key: str, value: str, path: os.PathLike) -> Checkpoint:
    """:func:`load` the checkpoint a config key names (``trainer.resume``, ``checkpoint``): errors name the key."""
    try:
        return load(path)
    except UserError as err:
        raise UserError(f"{key}={value}: {err}") from None


def _unwritable(path: Path, err: OSError) -> UserError:
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return UserError(f"cannot write checkpoint {path}: {err.strerror or err}{where}")


def load(path: os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint; every way it can be wrong is a :class:`UserError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as from_bytes

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"checkpoint {path} cannot be read: {err.strerror}") from None
    try:  # the header first: a truncated file is named as such, before safetensors reports it in its own words
        meta = _metadata(data)
        tensors = from_bytes(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise UserError(
            f"checkpoint {path} is not a cnnrun checkpoint or is damaged (truncated or not safetensors: {err})"
        ) from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is a safetensors file but not a cnnrun checkpoint (no '{FORMAT}' tag)")
    if int(meta.get("version", "0")) > VERSION:
        raise UserError(f"checkpoint {path} has format version {meta['version']}; this cnnrun reads up to {VERSION}")
    if _digest(tensors) != meta.get("sha256"):
        raise UserError(f"checkpoint {path} is damaged: its tensors do not match the checksum stored in it")
    try:
        return Checkpoint(
            weights={k: v for k, v in tensors.items() if not k.startswith(TRAIN_PREFIX)},
            training_state={k[len(TRAIN_PREFIX) :]: v for k, v in tensors.items() if k.startswith(TRAIN_PREFIX)},
            spec=json.loads(meta["spec"]),
            input_shape=tuple(json.loads(meta["input_shape"])),
            class_names=tuple(json.loads(meta["class_names"])),
            mean=tuple(json.loads(meta["mean"])),
            std=tuple(json.loads(meta["std"])),
            origin=json.loads(meta.get("origin", "{}")),
            progress=json.loads(meta.get("progress", "{}")),
            split=json.loads(meta.get("split", "{}")),
        )
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise UserError(f"checkpoint {path} has incomplete metadata ({err})") from None


def _metadata(data: bytes) -> Dict[str, str]:
    """The safetensors header's __metadata__ (parsed as JSON only; never executed)."""
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def check_matches(ckpt: Checkpoint, expected: Dict[str, tuple], path: Optional[os.PathLike] = None) -> None:
    """Refuse a checkpoint whose tensors are not exactly the model's, saying which layers differ."""
    have = {k: tuple(v.shape) for k, v in ckpt.weights.items()}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    wrong = sorted(k for k in set(have) & set(expected) if have[k] != tuple(expected[k]))
    if not (missing or extra or wrong):
        return
    lines = [f"checkpoint {path or ''} does not fit this model:".replace("  ", " ")]
    if missing:
        lines.append(f"  missing: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if extra:
        lines.append(f"  not in the model: {', '.join(extra[:8])}{' …' if len(extra) > 8 else ''}")
    for k in wrong[:8]:
        lines.append(f"  {k}: checkpoint {have[k]}, model {tuple(expected[k])}")
    raise UserError("\n".join(lines))
