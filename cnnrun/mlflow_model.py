"""A trained cnnrun model as an MLflow ``pyfunc`` model: ``mlflow.pyfunc.load_model(uri).predict(images)``.

The model holds cnnrun's safetensors checkpoint as its one artifact. Loading builds a runner on the CPU with the
framework the checkpoint was trained with (any other installed one when that is missing: the weights are in
cnnrun's framework-neutral layout), so torch, tensorflow, keras and chainer models all load. Loading needs cnnrun
installed (the pickled wrapper refers to this module).

``predict`` takes images (N, H, W, C), also (N, H, W) for one channel or flattened rows (N, H*W*C) (a DataFrame of
such rows too), in one of two forms: integer pixel values 0..255 (uint8, or any integer type, e.g. from JSON) or
floats in [0, 1] (the form most Keras and PyTorch code holds; multiplied by 255 and rounded). Anything else is
refused with a message that says what was received and what is expected: another shape or number of channels,
floats outside [0, 1] (e.g. 0..255 values as floats: send them as integers or divide by 255), NaN, booleans,
strings. It returns the class probabilities, float32 (N, classes).

The logged signature states the canonical input, uint8 (-1, H, W, C), and the output; with an input example. MLflow
itself would refuse every dtype but the signature's, so the signature is marked as checked by the model (as MLflow
does for type-hinted models): this module checks each input, in Python and behind ``mlflow models serve`` alike.

``log_pyfunc`` is called by :meth:`cnnrun.tracking.MlflowLogger.log_model` at the end of training
(``tracking.log_model=true``), and registers the model when ``tracking.register_model`` names it. No environment
inference; MLflow runs the input example through the model once, in this process, to check that it serves.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cnnrun.metrics import softmax

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - MLflow is a dependency
    PythonModel = object

ARTIFACT = "checkpoint"


class CnnrunModel(PythonModel):
    """MLflow pyfunc wrapper: builds cnnrun's runner from the checkpoint artifact at load time."""

    _skip_type_hint_validation = True  # predict checks its input itself (see as_images)

    def load_context(self, context) -> None:
        self.predictor = load_with_any_framework(Path(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input, params: Optional[dict] = None) -> np.ndarray:
        from cnnrun.predictor import probabilities

        try:
            images = as_images(model_input, tuple(self.predictor.input_shape))
        except ValueError as err:  # MLflow's own kind of input error: HTTP 400 behind `mlflow models serve`
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(f"cnnrun model input: {err}") from None
        return probabilities(self.predictor, images, int((params or {}).get("batch_size", 256)))


def load_with_any_framework(path: Path):
    """The checkpoint's predictor on the CPU, in the framework it was trained with if installed, else another."""
    from cnnrun import checkpoint as ckpt_io
    from cnnrun.backends import BACKENDS
    from cnnrun.errors import UserError
    from cnnrun.predictor import checkpoint_predictor

    recorded = ckpt_io.load(path).origin.get("framework") or "torch"
    failures = []
    for name in [recorded] + [name for name in BACKENDS if name != recorded]:
        try:
            return checkpoint_predictor(path, name)
        except UserError as err:  # that framework is not installed here: the weights load into any other
            failures.append(str(err))
    raise UserError("no framework can load this model: " + "; ".join(failures))


def as_images(model_input: Any, input_shape) -> np.ndarray:
    """Whatever predict received → uint8 (N, H, W, C) as the runners expect, or a ValueError saying what is wrong."""
    channels, height, width = input_shape
    expected = f"images (N, {height}, {width}, {channels})"
    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": ...} from a serving request
        model_input = next(iter(model_input.values()))
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame or Series of flattened images
        model_input = model_input.to_numpy()
    try:
        array = np.asarray(model_input)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"expected {expected}; received input that is not a rectangular array ({err})") from None
    array = _as_nhwc(array, channels, height, width, expected)
    return _as_pixels(array)


def _as_nhwc(array: np.ndarray, channels: int, height: int, width: int, expected: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] == height * width * channels:
        return array.reshape(-1, height, width, channels)
    if array.ndim == 3 and channels == 1 and array.shape[1:] == (height, width):
        return array[..., None]
    if array.ndim == 4 and array.shape[1:3] == (height, width) and array.shape[3] != channels:
        raise ValueError(f"expected {expected}: {channels} channel(s) last; received {array.shape[3]} channel(s), "
                         f"shape {array.shape}" + (" (convert to grayscale)" if channels == 1 else ""))
    if array.ndim == 4 and array.shape[1] == channels and array.shape[2:] == (height, width):
        raise ValueError(f"expected {expected}, channels last; received channels first, shape {array.shape} "
                         "(transpose to (N, H, W, C))")
    if array.ndim != 4 or array.shape[1:] != (height, width, channels):
        raise ValueError(f"expected {expected}, also (N, {height}, {width}) for one channel or flattened rows "
                         f"(N, {height * width * channels}); received shape {array.shape}")
    return array


def _as_pixels(array: np.ndarray) -> np.ndarray:
    """uint8 as it is; other integers when within 0..255; floats when within [0, 1]; nothing else."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"expected integer pixel values 0..255; received {array.dtype} values from "
                             f"{array.min()} to {array.max()}")
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if array.size and not np.isfinite(array).all():
            raise ValueError("expected float images in [0, 1]; received NaN or infinite values")
        if array.size and (array.min() < 0 or array.max() > 1):
            hint = (" (pixel values 0..255: send them as integers, e.g. uint8, or divide by 255)"
                    if array.max() <= 255 and array.min() >= 0 else "")
            raise ValueError(f"expected float images in [0, 1]; received {array.dtype} values from "
                             f"{array.min():g} to {array.max():g}{hint}")
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"expected uint8 (or integer 0..255) images or float images in [0, 1]; received dtype "
                     f"{array.dtype}")


def log_pyfunc(run_id: str, checkpoint: Path, name: str = "model", register_as: Optional[str] = None):
    """Log ``checkpoint`` as the run's pyfunc model (MLflow 3: a LoggedModel linked to the run), with its
    signature and an input example; register it as ``register_as`` (a new version, linked to the run) if given."""
    import importlib.metadata

    import mlflow

    from cnnrun import checkpoint as ckpt_io
    from cnnrun.backends import BACKENDS

    ckpt = ckpt_io.load(checkpoint)
    framework = ckpt.origin.get("framework", "torch")
    requirements = [f"mlflow=={mlflow.__version__}"]
    needed = BACKENDS[framework].requirements if framework in BACKENDS else ()
    for package in ["numpy", "pydantic", "safetensors", "pyyaml", *needed]:
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(package)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings(), _quiet("mlflow.pyfunc", "mlflow.models"):
        warnings.simplefilter("ignore")  # advice for hand-written models (type hints, input examples)
        info = _log(run_id, checkpoint, name, signature(ckpt), requirements, ckpt, framework)
    if register_as:
        _register(info, register_as, run_id)
    return info


def signature(ckpt):
    """uint8 images (-1, H, W, C) → float32 probabilities (-1, classes); checked by the model (see the module)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    channels, height, width = ckpt.input_shape
    result = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels))]),
                            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(ckpt.class_names)))]))
    # MLflow would refuse the float form before predict sees it; what it does for type-hinted models instead:
    # the signature is recorded, and the model checks its input (as_images).
    result._is_signature_from_type_hint = True
    return result


def input_example(ckpt) -> np.ndarray:
    """Two mid-grey images: small (a few KB of JSON) and in the canonical uint8 form."""
    channels, height, width = ckpt.input_shape
    return np.full((2, height, width, channels), 128, np.uint8)


def _register(info, name: str, run_id: str):
    import mlflow

    with _quiet("mlflow.tracking._model_registry", "mlflow.store.model_registry"):
        return mlflow.register_model(f"runs:/{run_id}/{info.name or 'model'}", name)


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
        input_example=input_example(ckpt),
        pip_requirements=requirements,  # stated, not inferred: inference would load the model in a subprocess
        metadata={
            "cnnrun_framework": framework,
            "class_names": list(ckpt.class_names),
            "input": f"images (N, {ckpt.input_shape[1]}, {ckpt.input_shape[2]}, {ckpt.input_shape[0]}): uint8 "
                     "(or integers 0..255) or floats in [0, 1]",
            "output": f"float32 class probabilities (N, {len(ckpt.class_names)})",
        },
    )
