"""A trained cnnrun model as an MLflow ``pyfunc`` model: ``mlflow.pyfunc.load_model(uri).predict(images)``.

The model holds cnnrun's safetensors checkpoint as its one artifact. Loading builds a runner on the CPU with the
framework the checkpoint was trained with (any other installed one when that is missing: the weights are in
cnnrun's framework-neutral layout), so torch, tensorflow, keras and chainer models all load. Loading needs cnnrun
installed (the pickled wrapper refers to this module). ``predict`` takes uint8 images (N, H, W, C) — also
(N, H, W) for one channel, flattened rows (N, H*W*C) or a DataFrame of such rows — and returns the class
probabilities, float32 (N, classes).

``log_pyfunc`` is called by :meth:`cnnrun.tracking.MlflowLogger.log_model` at the end of training
(``tracking.log_model=true``); it is cheap: no environment inference, no input example run.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a dependency
    PythonModel = object

ARTIFACT = "checkpoint"
FRAMEWORK_PACKAGES = {"torch": ["torch"], "tensorflow": ["tensorflow"], "keras": ["keras", "tensorflow"],
                      "chainer": ["chainer", "setuptools"]}


class CnnrunModel(PythonModel):
    """MLflow pyfunc wrapper: builds cnnrun's runner from the checkpoint artifact at load time."""

    _skip_type_hint_validation = True  # predict accepts several input forms (see as_images): no schema check

    def load_context(self, context) -> None:
        self.runner, self.checkpoint, self.framework = build_runner(Path(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input, params: Optional[dict] = None) -> np.ndarray:
        images = as_images(model_input, tuple(self.checkpoint.input_shape))
        batch = int((params or {}).get("batch_size", 256))
        out = [softmax(self.runner.predict_logits(images[i : i + batch])) for i in range(0, len(images), batch)]
        classes = len(self.checkpoint.class_names)
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, classes), np.float32)


def build_runner(path: Path, framework: Optional[str] = None):
    """(runner with the checkpoint's weights on the CPU, checkpoint, framework used)."""
    from cnnrun import checkpoint as ckpt_io
    from cnnrun.backends import BACKENDS, create_runner, validate_options
    from cnnrun.config import DeviceConfig, OptimizerConfig
    from cnnrun.errors import UserError
    from cnnrun.spec import compile_model

    ckpt = ckpt_io.load(path)
    compiled = compile_model(ckpt.spec, tuple(ckpt.input_shape), len(ckpt.class_names), f"checkpoint {path}")
    recorded = framework or ckpt.origin.get("framework") or "torch"
    candidates = [recorded] + [name for name in BACKENDS if name != recorded]
    optimizer = OptimizerConfig(name="sgd", lr=0.01)  # unused: the runner only predicts
    failures = []
    for name in candidates:
        try:
            runner = create_runner(name, compiled, optimizer, validate_options(name, {}), DeviceConfig(name="cpu"),
                                   0, ckpt.mean, ckpt.std)
        except UserError as err:  # that framework is not installed here: the weights load into any other
            failures.append(str(err))
            continue
        runner.set_weights(ckpt.weights)
        return runner, ckpt, name
    raise UserError("no framework can load this model: " + "; ".join(failures))


def as_images(model_input: Any, input_shape) -> np.ndarray:
    """Whatever predict received → uint8-valued (N, H, W, C) as the runners expect."""
    channels, height, width = input_shape
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} from a serving request
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame or Series of flattened images
        model_input = model_input.to_numpy()
    array = np.asarray(model_input)
    if array.ndim == 2 and array.shape[1] == height * width * channels:
        array = array.reshape(-1, height, width, channels)
    elif array.ndim == 3 and channels == 1:
        array = array[..., None]
    if array.ndim != 4 or array.shape[1:] != (height, width, channels):
        raise ValueError(f"expected images (N, {height}, {width}, {channels}); received shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_pyfunc(run_id: str, checkpoint: Path, name: str = "model"):
    """Log ``checkpoint`` as the run's pyfunc model (MLflow 3: a LoggedModel linked to the run)."""
    import importlib.metadata

    import mlflow

    from cnnrun import checkpoint as ckpt_io

    ckpt = ckpt_io.load(checkpoint)
    # No MLflow signature: one would make pyfunc refuse all but exactly uint8 (N, H, W, C) before predict sees
    # the input; the metadata says what the model expects instead.
    signature = None
    framework = ckpt.origin.get("framework", "torch")
    requirements = [f"mlflow=={mlflow.__version__}"]
    for package in ["numpy", "pydantic", "safetensors", "pyyaml"] + FRAMEWORK_PACKAGES.get(framework, []):
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(package)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings(), _quiet("mlflow.pyfunc", "mlflow.models"):
        warnings.simplefilter("ignore")  # advice for hand-written models (type hints, input examples)
        return _log(run_id, checkpoint, name, signature, requirements, ckpt, framework)


@contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _log(run_id, checkpoint, name, signature, requirements, ckpt, framework):
    import mlflow
    from mlflow.models import Model

    # Created here, in the run's experiment: left to itself MLflow 3 puts a model logged outside an active run
    # into the default experiment, where runs:/<run id>/model does not find it.
    client = mlflow.MlflowClient(mlflow.get_tracking_uri())
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="cnnrun")
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=model.model_id,
        python_model=CnnrunModel(),
        artifacts={ARTIFACT: str(checkpoint)},
        signature=signature,
        pip_requirements=requirements,  # stated, not inferred: inference would load the model in a subprocess
        metadata={
            "cnnrun_framework": framework,
            "class_names": list(ckpt.class_names),
            "input": f"uint8 images (N, {ckpt.input_shape[1]}, {ckpt.input_shape[2]}, {ckpt.input_shape[0]})",
            "output": f"float32 class probabilities (N, {len(ckpt.class_names)})",
        },
    )
