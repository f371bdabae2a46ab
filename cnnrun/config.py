"""The run configuration as typed, validated objects.

Hydra composes the YAML; these pydantic models check it, all groups at once, so a user sees every problem in
one message with its dotted key. The ``model`` group is checked by :mod:`cnnrun.spec`; a framework's own
options by the class its backend registers (:mod:`cnnrun.backends`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from cnnrun.errors import ConfigError, Problem
from cnnrun.spec.layers import _pair
from cnnrun.spec.validation import problems_from
from cnnrun.sweep.objective import DEFAULT_OBJECTIVE, unknown_objective


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(_Group):
    name: str = Field(default="auto", description="cpu, cuda, cuda:N or auto (cuda when usable, else cpu).")
    index: Optional[int] = Field(default=None, ge=0, description="GPU index for cuda; same as name=cuda:N.")
    threads: Optional[int] = Field(default=None, gt=0, description="CPU threads for the framework; null = all cores.")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("cpu", "cuda", "auto") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"expected 'cpu', 'cuda', 'cuda:N' or 'auto'; received {value!r}")
        return value

    @property
    def kind(self) -> str:
        return self.name.partition(":")[0]

    @property
    def cuda_index(self) -> int:
        _, _, index = self.name.partition(":")
        return int(index) if index else (self.index or 0)


class AugmentConfig(_Group):
    """Training-batch augmentations (conf/dataset/augment/*.yaml), all seeded per batch."""

    random_resized_crop: bool = Field(default=False, description="torchvision's RandomResizedCrop, then resize back.")
    resized_crop_scale: Tuple[float, float] = Field(default=(0.08, 1.0), description="Box area, share of the image.")
    resized_crop_ratio: Tuple[float, float] = Field(default=(0.75, 4 / 3), description="Box aspect ratio range.")
    random_crop_padding: int = Field(default=0, ge=0, description="Pad by this many pixels, then crop back at random.")
    horizontal_flip: bool = False
    vertical_flip: bool = False
    mixup_alpha: float = Field(default=0.0, ge=0.0, description="Mixup with λ ~ Beta(α, α); 0 = off.")
    cutmix_alpha: float = Field(default=0.0, ge=0.0, description="CutMix with λ ~ Beta(α, α); 0 = off.")

    @field_validator("resized_crop_scale", "resized_crop_ratio")
    @classmethod
    def _range(cls, value: Tuple[float, float]) -> Tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"expected [low, high] with 0 < low <= high; received {list(value)}")
        return value

    @field_validator("resized_crop_scale")
    @classmethod
    def _at_most_the_image(cls, value: Tuple[float, float]) -> Tuple[float, float]:
        if value[1] > 1:
            raise ValueError(f"a crop covers at most the whole image (scale <= 1); received {list(value)}")
        return value

    @property
    def any(self) -> bool:
        """Whether any augmentation is on (the trainer draws nothing otherwise)."""
        return bool(self.random_resized_crop or self.random_crop_padding or self.horizontal_flip
                    or self.vertical_flip or self.mixup_alpha or self.cutmix_alpha)


class DatasetConfig(_Group):
    name: str
    num_classes: int = Field(gt=1)
    channels: int = Field(gt=0)
    image_size: Tuple[int, int] = Field(description="[height, width] of the images the model receives; n: [n, n].")
    root: Optional[str] = Field(default=None, description="Where the files are (or go, for downloads).")
    download: bool = True
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    split_seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    cache: bool = Field(
        default=True,
        description="Keep decoded images in a memory-mapped cache file (decode once); false: dataset=folder "
        "decodes each batch's files when the batch is prepared, for folders too large to cache.",
    )
    on_device: Literal["auto", True, False] = Field(
        default="auto",
        description="true: every split's images are copied once into the framework's arrays on the run's device "
        "(GPU memory on a GPU) and each batch is gathered there, with no copy per step; false: batches are "
        "prepared on the host (read from the memory-mapped cache, augmented, on a background thread) and copied "
        "to the device; auto: true on a GPU when the images take at most a quarter of its free memory, else false. "
        "Augmentations and dataset.cache=false need host batches.",
    )

    @field_validator("cache")
    @classmethod
    def _only_folders_skip_the_cache(cls, value: bool, info: ValidationInfo) -> bool:
        # The downloadable datasets are decoded from archives, not files one per image: nothing to decode per batch.
        if not value and info.data.get("name") != "folder":
            raise ValueError("dataset.cache=false decodes image files per batch: only dataset=folder has them")
        return value

    @field_validator("on_device")
    @classmethod
    def _held_batches_are_plain(cls, value, info: ValidationInfo):
        # Augmentations and on-the-fly decoding work on host batches: a held dataset could only skip them.
        if value is True:
            augment = info.data.get("augment")
            if augment is not None and augment.any:
                raise ValueError("true gathers batches on the device, but dataset.augment runs on host batches: "
                                 "set dataset.on_device=auto or false to augment")
            if info.data.get("cache") is False:
                raise ValueError("true holds every decoded image on the device, and dataset.cache=false decodes "
                                 "each batch's files as needed: set dataset.on_device=auto or false")
        return value

    _square = field_validator("image_size", mode="before")(lambda cls, v: _pair(v, "image_size", 1))

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.channels, *self.image_size)


class OptimizerConfig(_Group):
    """Every hyperparameter stated, so that each framework runs the same update (their defaults differ)."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"]
    lr: float = Field(gt=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    eps: float = Field(default=1e-7, gt=0.0)
    alpha: float = Field(default=0.99, ge=0.0, lt=1.0, description="RMSprop's smoothing of the squared gradient.")
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(
        default=0.0, ge=0.0, description="L2 penalty added to the gradient; adamw: decoupled decay of the weights."
    )
    clip_norm: Optional[float] = Field(default=None, gt=0.0, description="Clip gradients to this global L2 norm.")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, value: bool, info: ValidationInfo) -> bool:
        # Nesterov's look-ahead is a momentum step: without momentum torch refuses it and the others quietly
        # run plain SGD, so the three would train different things.
        momentum = info.data.get("momentum")
        if value and info.data.get("name") == "sgd" and momentum == 0:
            raise ValueError(
                f"nesterov=true needs optimizer.momentum > 0 (received momentum={momentum}); "
                "set optimizer.momentum (e.g. 0.9) or optimizer.nesterov=false"
            )
        return value


class TrainerConfig(_Group):
    epochs: int = Field(default=10, gt=0)
    batch_size: int = Field(default=128, gt=0)
    eval_batch_size: int = Field(default=512, gt=0)
    seed: int = 0
    patience: Optional[int] = Field(default=3, gt=0, description="Epochs without val improvement before stopping.")
    restore_best: bool = Field(default=True, description="Test with the best-validation weights.")
    log_every: int = Field(default=20, gt=0, description="Steps between progress updates (each one syncs).")
    max_time: Optional[float] = Field(default=None, gt=0, description="Seconds; stop cleanly after this long.")
    resume: Optional[str] = Field(default=None, description="A checkpoint path, or 'last'.")
    progress: bool = True
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Compute in float32, or bfloat16/float16 with float32 weights (cnnrun.precision)."
    )
    devices: int = Field(default=1, gt=0, description="Data-parallel processes on this machine (GPUs, or CPU "
                                                      "processes); batch_size stays the global batch.")
    sync_batchnorm: bool = Field(default=False, description="Batchnorm statistics over all processes' rows.")


class TrackingConfig(_Group):
    enabled: bool = True
    uri: str = Field(default="sqlite:///mlflow.db", description="Any MLflow tracking URI.")
    experiment: str = "cnnrun"
    run_name: Optional[str] = None
    log_model: bool = Field(default=True, description="Log the trained model as an MLflow pyfunc model too.")
    register_model: Optional[str] = Field(
        default=None, min_length=1, description="Register the logged model under this name in the model registry."
    )

    @model_validator(mode="after")
    def _registering_needs_the_model(self) -> "TrackingConfig":
        if self.register_model and not (self.log_model and self.enabled):
            raise ValueError(f"tracking.register_model={self.register_model} registers the logged model: it needs "
                             "tracking.log_model=true and tracking.enabled=true")
        return self


class SweepConfig(_Group):
    """Multirun (``-m``) settings: what each job returns to the sweep, and which jobs run again."""

    objective: str = Field(default=DEFAULT_OBJECTIVE, description="The metric each job returns (Optuna optimizes it).")
    direction: Literal["maximize", "minimize"] = "maximize"
    rerun: bool = Field(default=False, description="Train a job again even if its config already FINISHED.")

    @field_validator("objective")
    @classmethod
    def _logged_by_a_run(cls, value: str) -> str:
        problem = unknown_objective(value)
        if problem:
            raise ValueError(problem)
        return value


class SummaryConfig(_Group):
    format: Literal["table", "json"] = "table"


class PredictConfig(_Group):
    """task=predict: how many classes to report per image, where to write them, and batching."""

    top_k: Optional[int] = Field(
        default=None, ge=1, description="Classes reported per image, most probable first; null: 5 (or all, if fewer)."
    )
    output: Optional[str] = Field(default=None, description="Also write the predictions to this .csv or .json file.")
    batch_size: int = Field(default=256, gt=0)
    progress: bool = Field(default=True, description="A progress bar (plain lines when not a terminal).")

    @field_validator("output")
    @classmethod
    def _csv_or_json(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.lower().endswith(PREDICTION_FORMATS):
            raise ValueError(f"expected a file name ending in .csv or .json; received {value!r}")
        return value


PREDICTION_FORMATS = (".csv", ".json")


class ExportConfig(_Group):
    """task=export: which format, and where (default: beside the checkpoint, see cnnrun.export)."""

    format: str = Field(default="onnx", description="onnx, torchscript, saved_model or keras.")
    output: Optional[str] = Field(default=None, description="Where to write; default: beside the checkpoint.")

    @field_validator("format")
    @classmethod
    def _known(cls, value: str) -> str:
        from cnnrun.export import check_format_name

        return check_format_name(value)


class FrameworkConfig(BaseModel):
    """``name`` picks the backend; the other keys are that backend's options, checked by its own class."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def options(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


TASKS = ("train", "summary", "eval", "validate", "predict", "export")


class RunConfig(_Group):
    task: Literal["train", "summary", "eval", "validate", "predict", "export"] = "train"
    model: Dict[str, Any]
    framework: FrameworkConfig
    device: DeviceConfig
    dataset: DatasetConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    schedule: Dict[str, Any] = Field(default_factory=lambda: {"name": "constant"},
                                     description="The learning-rate schedule; checked by cnnrun.schedules.")
    summary: SummaryConfig = SummaryConfig()
    sweep: SweepConfig = SweepConfig()
    checkpoint: Optional[str] = Field(default=None, description="A checkpoint to evaluate, predict with or export.")
    inputs: Optional[Union[str, List[str]]] = Field(
        default=None, description="task=predict: image files, folders (searched recursively) or glob patterns."
    )
    predict: PredictConfig = PredictConfig()
    export: ExportConfig = ExportConfig()


def validate_run_config(data: Dict[str, Any], source: str = "the config") -> RunConfig:
    """Check every group except ``model`` (see :func:`cnnrun.spec.compile_model`); raise one ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(problems_from(err, "", RunConfig), source) from None


def flatten_for_logging(data: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """Nested config → {'model.layers.0.filters': '32', ...} for MLflow params (lists indexed like Hydra)."""
    flat: Dict[str, str] = {}
    items: List[Tuple[str, Any]]
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    else:
        items = [(str(i), v) for i, v in enumerate(data)]
    for key, value in items:
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, (dict, list, tuple)) and value and not _is_pair(value):
            flat.update(flatten_for_logging(value if isinstance(value, dict) else list(value), full))
        else:
            flat[full] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)


__all__ = [
    "AugmentConfig",
    "DatasetConfig",
    "DeviceConfig",
    "ExportConfig",
    "FrameworkConfig",
    "OptimizerConfig",
    "PredictConfig",
    "Problem",
    "RunConfig",
    "SummaryConfig",
    "SweepConfig",
    "TrackingConfig",
    "TrainerConfig",
    "validate_run_config",
]
