"""The Backend protocol and the name → module table.

A backend turns a :class:`~cnnrun.spec.CompiledModel` into a framework model plus optimizer (a
:class:`Runner`), on a device. Its module is imported only when that framework is asked for, so training with
one framework never imports another. Adding a framework: one module here implementing ``create_runner`` and
``framework_version`` (its layers built by one builder per layer type, see :mod:`cnnrun.backends.building`),
its entry in ``BACKENDS`` (a :class:`BackendInfo`: options class and the facts tests and tools read), and
``conf/framework/<name>.yaml``. The test tables (equivalence, lazy imports, resume, GPU, cross-framework eval)
iterate ``BACKENDS`` and read these facts, so a new framework joins them all.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Literal, Optional, Protocol, Tuple, Type, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnnrun.errors import ConfigError, Problem, UserError, did_you_mean, one_of
from cnnrun.precision import PRECISIONS
from cnnrun.spec.validation import problems_from

if TYPE_CHECKING:  # NumPy only types this table's protocol: checking options (task=summary) does not import it
    import numpy as np

Weights = Dict[str, "np.ndarray"]


class Runner(Protocol):
    """A built model with its optimizer on a device. Images arrive as (N, H, W, C) uint8, labels as int64: NumPy
    batches, or batches gathered from what :meth:`hold` put on the device (see :mod:`cnnrun.data.feed`)."""

    device_name: str  # what it really runs on, e.g. "cpu" or "cuda:0 (NVIDIA H100)"

    def hold(self, array) -> Any:
        """``array`` (an array or a memory-mapped split) copied once into the framework's own array on this
        runner's device, for batches gathered there."""

    def gather(self, held, index) -> Any:
        """Rows ``index`` (a held int64 vector) of ``held``, on the device."""

    def stage(self, array: np.ndarray) -> Any:
        """A host batch made ready for its step ahead of time, called on the prefetch thread: copied to a GPU
        there (asynchronously to the running step), or returned as it is."""

    def device_memory(self) -> Optional[int]:
        """Bytes free on the device; None on the CPU, or where the framework cannot say."""

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        """One optimizer step. Must not wait for the device: metrics accumulate where they are computed.

        ``mix`` (a :class:`cnnrun.data.augment.Mix`, for mixup/cutmix batches): the loss is
        λ·CE(labels) + (1 − λ)·CE(mix.partner_labels); accuracy still counts against ``labels``.
        """

    def set_learning_rate(self, lr: float) -> None:
        """The rate for the next steps (a schedule's value; see :mod:`cnnrun.schedules`)."""

    def learning_rate(self) -> float:
        """The rate the framework's optimizer holds now, read back from it."""

    def train_metrics(self) -> Tuple[float, float, int]:
        """(mean loss, accuracy, samples) since the last call; the one place a training sync happens."""

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        """Pre-softmax outputs in inference mode (dropout off, batchnorm running statistics), float32."""

    def get_weights(self) -> Weights:
        """Every tensor of the model in cnnrun's canonical layout (see :mod:`cnnrun.layout`)."""

    def set_weights(self, weights: Weights) -> None:
        """Load canonical tensors; shapes must match the compiled model's."""

    def get_training_state(self) -> Weights:
        """Optimizer slots and counters as arrays, for exact resume in the same framework."""

    def set_training_state(self, state: Weights) -> None:
        """Restore what :meth:`get_training_state` returned."""


def mean_metrics(loss_sum: float, correct: int, count: int) -> Tuple[float, float, int]:
    """What :meth:`Runner.train_metrics` returns from a runner's running sums: NaNs when no step was taken."""
    return (loss_sum / count, correct / count, count) if count else (math.nan, math.nan, 0)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TorchOptions(_Options):
    channels_last: bool = Field(default=True, description="NHWC memory format for convolutions (faster on CPU).")
    fused_optimizer: bool = Field(default=True, description="torch.optim's fused Adam/SGD kernels.")
    compile: bool = Field(default=False, description="torch.compile the model (off: see benchmarks/RESULTS.md).")
    tf32: bool = Field(
        default=False,
        description="TensorFloat-32 convolutions and matmuls on CUDA GPUs: faster, ~1e-3 relative error.",
    )
    cudnn_benchmark: bool = Field(
        default=True,
        description="On CUDA GPUs cuDNN times its convolution algorithms for each input shape at first use and "
        "keeps the fastest (as TensorFlow does by default); false: its heuristic choice, no timing.",
    )


class TensorFlowOptions(_Options):
    jit_compile: bool = Field(default=False, description="XLA-compile the train step (slower on CPU here).")


class KerasOptions(_Options):
    backend: Literal["tensorflow", "torch"] = Field(default="tensorflow", description="Keras 3 backend.")
    jit_compile: bool = False


class ChainerOptions(_Options):
    cudnn: bool = Field(default=True, description="Use cuDNN on CUDA when CuPy has it.")


@dataclass(frozen=True)
class Tolerances:
    """How close this framework's numbers must be to the reference (PyTorch) on one spec and weights (the
    equivalence suite), and to its own across an interrupt and resume (0: bit for bit)."""

    logits: float = 1e-4
    losses: float = 1e-3
    resume: float = 0.0


@dataclass(frozen=True)
class Parallel:
    """How a framework trains on several processes (``trainer.devices``; see :mod:`cnnrun.distributed`)."""

    module: str  # the engine: launch/join/wrap
    joins: str  # the launcher whose worlds it joins: "torchrun", "tf_config" or "mpi" (cnnrun.distributed.world)
    sync_batchnorm_refusal: Optional[str] = None  # why trainer.sync_batchnorm=true cannot work, where it cannot


@dataclass(frozen=True)
class BackendInfo:
    module: str
    package: str  # the import that proves the framework is installed
    options: Type[_Options]
    layout: str  # its native tensor layout: cnnrun.layout's CHANNELS_FIRST or CHANNELS_LAST
    # Framework packages training with it may import (tests/test_lazy_imports.py): its own and what it runs on.
    imports: FrozenSet[str]
    # The distributions a model logged from it needs (the MLflow model's pip requirements, besides cnnrun's own).
    requirements: Tuple[str, ...]
    tolerances: Tolerances = Tolerances()
    gpu: bool = True  # runs on CUDA GPUs (tests/backends/test_gpu.py)
    # Option sets that run it on different engines, each tested on its own (Keras: one per Keras backend).
    engines: Tuple[Dict[str, Any], ...] = ({},)
    # Optional fast paths, by a short name: options that must give the numbers of the engine they extend.
    fast_paths: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Data-parallel training; None: one process only. Keras trains on the engine of its backend's framework.
    parallel: Optional[Parallel] = None
    # Device kind → the trainer.precision values it trains in there (see cnnrun.precision).
    precisions: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: {"cpu": PRECISIONS, "cuda": PRECISIONS})

    def engine_packages(self, options: Dict[str, Any]) -> Tuple[str, ...]:
        """The packages ``options`` need: the framework's, plus the one it runs on (Keras's backend)."""
        engine = options.get("backend")
        extra = (BACKENDS[engine].package,) if engine in BACKENDS and engine != self.package else ()
        return (self.package, *extra)


_KERAS_ENGINES = get_args(KerasOptions.model_fields["backend"].annotation)

BACKENDS: Dict[str, BackendInfo] = {
    "torch": BackendInfo(
        "cnnrun.backends.torch", "torch", TorchOptions, "channels_first", frozenset({"torch"}), ("torch",),
        fast_paths={"plain": {"channels_last": False, "fused_optimizer": False}},
        parallel=Parallel("cnnrun.distributed.torch", joins="torchrun"),
    ),
    "tensorflow": BackendInfo(
        "cnnrun.backends.tensorflow", "tensorflow", TensorFlowOptions, "channels_last", frozenset({"tensorflow"}),
        ("tensorflow",), tolerances=Tolerances(resume=1e-5), fast_paths={"xla": {"jit_compile": True}},
        parallel=Parallel("cnnrun.distributed.tensorflow", joins="tf_config"),
    ),
    # Keras 3 on its default TensorFlow backend imports TensorFlow (the tensorflow backend hides Keras from
    # TensorFlow's own import of it, which also halves start-up).
    "keras": BackendInfo(
        "cnnrun.backends.keras", "keras", KerasOptions, "channels_last", frozenset({"keras", "tensorflow"}),
        ("keras", "tensorflow"), tolerances=Tolerances(resume=1e-5),
        engines=tuple({"backend": b} for b in _KERAS_ENGINES),
        fast_paths={"xla": {"backend": "tensorflow", "jit_compile": True}},
    ),
    "chainer": BackendInfo(
        "cnnrun.backends.chainer", "chainer", ChainerOptions, "channels_first", frozenset({"chainer"}),
        ("chainer", "setuptools"),  # Chainer imports pkg_resources where setuptools still has it
        # No bfloat16 (NumPy and CuPy lack the type), and mixed16 on CUDA only: NumPy's float16 convolutions are
        # emulated and far slower than float32.
        precisions={"cpu": ("fp32",), "cuda": ("fp32", "fp16")},
        parallel=Parallel(
            "cnnrun.distributed.chainer", joins="mpi",
            sync_batchnorm_refusal="ChainerMN's MultiNodeBatchNormalization averages each rank's mean (wrong when "
                                   "shards differ in size) and takes the variance as E[x²] − E[x]², which cancels "
                                   "in float32",
        ),
    ),
}


# Runtimes of exported models (``cnnrun task=export``): they predict, they cannot train. Imported lazily by
# cnnrun.predictor; only task=predict accepts them.
PREDICT_ONLY: Dict[str, str] = {"onnx": "cnnrun.export.onnx_runtime"}


def check_framework(task: str, name: str, options: Dict[str, Any]) -> None:
    """The framework and its ``framework.*`` options suit ``task``; a ConfigError otherwise."""
    if name not in PREDICT_ONLY:
        validate_options(name, options)
        return
    problems = []
    if task != "predict":
        problems.append(Problem("framework", f"framework={name} runs exported models and only predicts "
                                             f"(task=predict); task={task} needs one of {one_of(BACKENDS)}"))
    problems += [Problem(f"framework.{key}", f"unknown key; framework={name} has no options") for key in options]
    if problems:
        raise ConfigError(problems, f"framework={name}")


def backend_info(name: str) -> BackendInfo:
    info = BACKENDS.get(name)
    if info is None:
        raise UserError(f"framework.name: {_unknown(name)}")
    return info


def _unknown(name: str) -> str:
    return f"unknown framework '{name}'{did_you_mean(name, BACKENDS)}; available: {one_of(BACKENDS)}"


def validate_options(name: str, options: Dict[str, Any]) -> _Options:
    """Check ``framework.*`` keys against the backend's options class, without importing the framework."""
    info = BACKENDS.get(name)
    if info is None:
        raise ConfigError([Problem("framework.name", _unknown(name))], f"framework={name}")
    try:
        return info.options.model_validate(options)
    except ValidationError as err:
        raise ConfigError(problems_from(err, "framework", info.options), f"framework={name}") from None


def load_backend(name: str):
    """Import the backend module (and so its framework), with a clear error when the framework is missing."""
    info = backend_info(name)
    try:
        return importlib.import_module(info.module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != info.package:
            raise
        raise UserError(not_installed(name, info.package)) from None


def not_installed(name: str, package: str) -> str:
    return (f"framework={name} needs the {package} package, which is not installed; "
            "install the project's locked environment (README, command 1)")


def create_runner(name: str, model, optimizer, options, device, seed: int, mean, std,
                  label_smoothing: float = 0.0, precision: str = "fp32") -> Runner:
    """Build ``model`` in framework ``name``: the one entry point the trainer and the tests use.

    ``precision`` (``trainer.precision``, see :mod:`cnnrun.precision`) sets what the train step and inference
    compute in; weights, optimizer state and checkpoints stay float32.
    """
    return load_backend(name).create_runner(model, optimizer, options, device, seed, mean, std,
                                            label_smoothing=label_smoothing, precision=precision)


def check_precision(framework: str, device, device_kind: str, precision: str) -> None:
    """A UserError when ``framework`` cannot compute in ``precision`` on ``device_kind``, the device it resolved
    ``device`` (the DeviceConfig asked for, e.g. auto) to."""
    from cnnrun.precision import precision_problem

    message = precision_problem(framework, device_kind, precision)
    if message:
        resolved = f" (device={device.name} resolved to {device_kind})" if device.kind != device_kind else ""
        raise UserError(f"trainer.precision: {message}{resolved}")


def framework_version(name: str) -> str:
    return load_backend(name).framework_version()
