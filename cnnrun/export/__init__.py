"""Exporting a checkpoint (``task=export``): one module per format, and the table that names them.

ONNX is written from the compiled spec and canonical weights alone, so it serves checkpoints of every framework
and imports none. The native formats are written by their own framework from a runner holding the checkpoint's
weights. Every format takes uint8 images (N, H, W, C) and normalises them inside, as cnnrun's runners do.
This module imports nothing heavy: the config checks ``export.format`` against :data:`FORMATS`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from cnnrun.errors import UserError, did_you_mean, one_of

METADATA_PREFIX = "cnnrun."  # of the metadata every exported model carries (onnx_runtime reads it back)


@dataclass(frozen=True)
class ExportFormat:
    module: str  # has write(ckpt, model, path, options): writes the format at path
    framework: Optional[str]  # the framework that writes and reloads it; None: written without one (ONNX)
    suffix: str  # of the default output name
    description: str
    folder_marker: Optional[str] = None  # for a format written as a folder: the file every such folder holds


FORMATS: Dict[str, ExportFormat] = {
    "onnx": ExportFormat("cnnrun.export.onnx", None, ".onnx", "ONNX, for onnxruntime and every ONNX runtime"),
    "torchscript": ExportFormat("cnnrun.export.torchscript", "torch", ".pt", "TorchScript, torch.jit.load"),
    "saved_model": ExportFormat("cnnrun.export.saved_model", "tensorflow", ".savedmodel",
                                "TensorFlow SavedModel folder, tf.saved_model.load", folder_marker="saved_model.pb"),
    "keras": ExportFormat("cnnrun.export.keras_file", "keras", ".keras", "Keras 3 file, keras.saving.load_model"),
}


def check_format_name(name: str) -> str:
    """For the config's field validator: a known format name, or a message with the close match."""
    if name not in FORMATS:
        raise ValueError(f"expected {one_of(FORMATS)}; received {name!r}{did_you_mean(name, FORMATS)}")
    return name


def formats_for(framework: str) -> Tuple[str, ...]:
    """The formats a checkpoint exports to with ``framework``: its native ones and ONNX (which needs none)."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.framework in (None, framework))


def check_framework(format_name: str, framework: str) -> None:
    """Refuse a format its framework cannot write (e.g. TorchScript with framework=chainer), listing what can."""
    wanted = FORMATS[format_name].framework
    if wanted is None or wanted == framework:
        return
    valid = formats_for(framework)
    native = [name for name in valid if FORMATS[name].framework]
    plural = "s" if len(native) > 1 else ""
    has = f"its native format{plural} {one_of(native)}" if native else "no native serving format"
    raise UserError(
        f"export.format={format_name} is written by framework={wanted}, not framework={framework}; "
        f"{framework} has {has}. Formats for framework={framework}: {one_of(valid)} "
        f"(or drop framework= to use {wanted})"
    )


def default_output(checkpoint: Path, format_name: str) -> Path:
    """Beside the checkpoint, with the format's suffix: run/model.safetensors → run/model.onnx."""
    return checkpoint.with_suffix(FORMATS[format_name].suffix)


def model_metadata(ckpt, model) -> Dict[str, str]:
    """What every exported file carries besides the graph: classes, input shape, normalisation (JSON values)."""
    return {
        f"{METADATA_PREFIX}class_names": json.dumps(list(ckpt.class_names)),
        f"{METADATA_PREFIX}input_shape": json.dumps(list(model.input_shape)),
        f"{METADATA_PREFIX}input": "uint8 images (N, H, W, C), normalised inside the model",
        f"{METADATA_PREFIX}mean": json.dumps(list(ckpt.mean)),
        f"{METADATA_PREFIX}std": json.dumps(list(ckpt.std)),
        f"{METADATA_PREFIX}model": model.name,
        f"{METADATA_PREFIX}origin": json.dumps(ckpt.origin),
    }


def check_target(format_name: str, path: Path) -> None:
    """Refuse to replace anything but an earlier export of the same kind (a folder of the user's, say)."""
    fmt = FORMATS[format_name]
    if fmt.folder_marker is None and path.is_dir():
        raise UserError(f"export.output={path} is a folder; name the file to write, "
                        f"e.g. {path / ('model' + fmt.suffix)}")
    if fmt.folder_marker is not None and path.exists() and not (path / fmt.folder_marker).is_file():
        raise UserError(f"export.output={path} exists and is not a {format_name} export (no {fmt.folder_marker}), "
                        f"so cnnrun will not replace it; choose a new path, e.g. {path / ('model' + fmt.suffix)}")


def write(format_name: str, ckpt, model, path: Path, options) -> Path:
    """Write the format at ``path`` atomically: built in a temporary sibling, then renamed over ``path``."""
    check_target(format_name, path)
    try:
        module = importlib.import_module(FORMATS[format_name].module)
    except ModuleNotFoundError as err:
        from cnnrun.backends import BACKENDS

        package = (err.name or "").split(".")[0]
        if package not in {"onnx", *(info.package for info in BACKENDS.values())}:
            raise
        extra = FORMATS[format_name].framework or "onnx"  # each framework's install extra bears its name
        raise UserError(f"export.format={format_name} needs the {package} package, which is not installed; "
                        f"pip install 'cnnrun[{extra}]'") from None
    return write_atomically(path, lambda tmp: module.write(ckpt, model, tmp, options))


def write_atomically(path: Path, writer: Callable[[Path], None]) -> Path:
    """``writer(tmp)`` makes a file or folder at ``tmp``; it replaces ``path`` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        built = scratch / path.name
        writer(built)
        if path.exists() and (built.is_dir() or path.is_dir()):  # rename cannot replace a folder: swap it out
            os.replace(path, scratch / "replaced")
        os.replace(built, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
