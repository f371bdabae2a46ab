"""What task=predict and the MLflow model run: a predictor, from a cnnrun checkpoint or an exported ONNX model.

A predictor knows its classes and input shape and turns uint8 images (N, H, W, C) into float32 logits
(N, classes), normalising them inside exactly as in training. A framework's runner built from a checkpoint is one
(:class:`RunnerPredictor`); ``cnnrun.export.onnx_runtime.load_onnx_predictor`` gives another for ``.onnx`` files,
imported only when asked for, so that predicting with one framework never imports another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Protocol, Tuple

import numpy as np

from cnnrun.backends import PREDICT_ONLY
from cnnrun.errors import UserError
from cnnrun.metrics import softmax

ONNX = "onnx"


class Predictor(Protocol):
    class_names: List[str]
    input_shape: Tuple[int, int, int]  # (C, H, W)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) → float32 logits (N, classes), in inference mode."""


@dataclass
class RunnerPredictor:
    """A framework runner with the checkpoint's weights, classes and input shape."""

    runner: Any
    class_names: List[str]
    input_shape: Tuple[int, int, int]
    framework: str

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        return self.runner.predict_logits(images)


def load_predictor(path: Path, framework: Optional[str] = None, options=None, device=None) -> Predictor:
    """A predictor for ``path``: an ``.onnx`` file (or ``framework=onnx``) runs with ONNX Runtime, a cnnrun
    checkpoint with ``framework`` (default: the framework it was trained with), on ``device`` (default: cpu)."""
    if framework == ONNX or path.suffix.lower() == ".onnx":
        if framework not in (None, ONNX):
            raise UserError(f"checkpoint={path} is an exported ONNX model: predict with framework=onnx "
                            f"(framework={framework} runs cnnrun .safetensors checkpoints)")
        if path.suffix.lower() != ".onnx":
            raise UserError(f"framework=onnx runs exported .onnx models, and checkpoint={path} is not one; export "
                            f"it first (cnnrun task=export checkpoint={path} export.format=onnx) or drop framework=onnx")
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist")
        return _onnx_runtime().load_onnx_predictor(path)
    return checkpoint_predictor(path, framework, options, device)


def _onnx_runtime():
    module = PREDICT_ONLY[ONNX]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (err.name.startswith("onnx") or module.startswith(err.name)):
            raise
        raise UserError(f"framework=onnx needs ONNX Runtime and cnnrun's ONNX support ({err.name} is missing): "
                        "pip install 'cnnrun[onnx]'") from None


def checkpoint_predictor(path: Path, framework: Optional[str] = None, options=None, device=None) -> RunnerPredictor:
    """The checkpoint's model built in ``framework`` (default: its own) with its weights; default options, cpu."""
    from cnnrun import checkpoint as ckpt_io
    from cnnrun.tasks.evaluate import load_model

    ckpt = ckpt_io.load(path)
    compiled = load_model(ckpt, path)
    name = framework or ckpt.origin.get("framework") or "torch"
    runner = checkpoint_runner(ckpt, compiled, name, options, device)
    return RunnerPredictor(runner, list(ckpt.class_names), tuple(ckpt.input_shape), name)


def checkpoint_runner(ckpt, compiled, framework: str, options=None, device=None):
    """A ``framework`` runner holding the checkpoint's weights, for inference (and export); default options, cpu."""
    from cnnrun.backends import create_runner, validate_options
    from cnnrun.config import DeviceConfig, OptimizerConfig

    options = options if options is not None else validate_options(framework, {})
    optimizer = OptimizerConfig(name="sgd", lr=0.01)  # unused: the runner only predicts
    runner = create_runner(framework, compiled, optimizer, options, device or DeviceConfig(name="cpu"), 0, ckpt.mean,
                           ckpt.std)
    runner.set_weights(ckpt.weights)
    return runner


def probabilities(predictor: Predictor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities, float32 (N, classes), computed ``batch_size`` images at a time."""
    parts = [softmax(predictor.predict_logits(batch)) for batch in batches(images, batch_size)]
    if not parts:
        return np.zeros((0, len(predictor.class_names)), np.float32)
    return np.concatenate(parts).astype(np.float32)


def batches(items, batch_size: int) -> Iterator:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
