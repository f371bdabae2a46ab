"""Run an exported ``.onnx`` model with onnxruntime alone: no training framework, not even the ``onnx`` package.

    predictor = load_onnx_predictor("model.onnx")
    logits = predictor.predict_logits(images)   # uint8 (N, H, W, C) → float32 (N, classes)

The predictor keeps a runner's ``predict_logits`` contract, so code that predicts with a runner predicts with it
too; classes and input shape come from the model's metadata_props (see :mod:`cnnrun.export.onnx`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np

from cnnrun.errors import UserError
from cnnrun.export import METADATA_PREFIX  # of the metadata_props cnnrun.export.onnx writes

LOGITS = "logits"  # the output this module reads; the graph's other output is "probabilities"


class OnnxPredictor:
    """An onnxruntime session over a cnnrun ONNX model, with the model's classes and input shape."""

    def __init__(self, session, class_names: List[str], input_shape: Tuple[int, int, int], path: Path):
        self.session = session
        self.class_names = class_names
        self.input_shape = input_shape
        self.path = path
        self.input_name = session.get_inputs()[0].name

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, C) → float32 logits (N, classes), as a runner's ``predict_logits``."""
        c, h, w = self.input_shape
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise UserError(
                f"{self.path} takes uint8 images of shape (N, {h}, {w}, {c}); "
                f"received {images.dtype} {tuple(images.shape)}"
            )
        return self.session.run([LOGITS], {self.input_name: images})[0].astype(np.float32, copy=False)


def load_onnx_predictor(path: os.PathLike) -> OnnxPredictor:
    """Open a cnnrun ``.onnx`` file on the CPU; a missing, damaged or foreign file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist")
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise UserError(
            f"{path} needs the onnxruntime package, which is not installed: pip install 'cnnrun[onnx]'"
        ) from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about the host, not the model
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for every kind of bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable ONNX model ({first})") from None
    props = session.get_modelmeta().custom_metadata_map
    try:
        class_names = [str(n) for n in json.loads(props[f"{METADATA_PREFIX}class_names"])]
        input_shape = tuple(int(d) for d in json.loads(props[f"{METADATA_PREFIX}input_shape"]))
    except (KeyError, ValueError, TypeError):
        raise UserError(
            f"{path} is an ONNX model but not one cnnrun exported (no {METADATA_PREFIX}class_names and "
            f"{METADATA_PREFIX}input_shape metadata); export it with cnnrun task=export export.format=onnx"
        ) from None
    if len(input_shape) != 3 or LOGITS not in [o.name for o in session.get_outputs()]:
        raise UserError(f"{path} has cnnrun metadata but not the (C, H, W) input and '{LOGITS}' output it states")
    return OnnxPredictor(session, class_names, input_shape, path)
