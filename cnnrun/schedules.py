"""Learning-rate schedules as pure functions of the training position.

Every framework gets its learning rate from here, set before each step (``Runner.set_learning_rate``), so a
schedule means the same number at every step in torch, TensorFlow, Keras and Chainer, and a resumed run picks it
up exactly: the rate is a function of (epoch, step) and, for ``plateau``, of a small state kept in the training
checkpoint. No framework's scheduler object is involved; the formulas are PyTorch's (``torch.optim.lr_scheduler``),
which the tests check them against.

Per-epoch schedules (``step``, ``multistep``, ``exponential``, ``plateau``) hold one rate for a whole epoch;
per-batch ones (``cosine``, ``onecycle``) change it every step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from typing import Annotated, Dict, List, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Constant(_Schedule):
    name: Literal["constant"] = "constant"


class Step(_Schedule):
    name: Literal["step"]
    step_size: int = Field(gt=0, description="Epochs between decays.")
    gamma: float = Field(gt=0.0, le=1.0, description="Factor applied every step_size epochs.")


class MultiStep(_Schedule):
    name: Literal["multistep"]
    milestones: List[int] = Field(min_length=1, description="Epochs (0-based) at which the rate is multiplied by gamma.")
    gamma: float = Field(gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _increasing(self) -> "MultiStep":
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be increasing epochs > 0; received {list(self.milestones)}")
        return self


class Exponential(_Schedule):
    name: Literal["exponential"]
    gamma: float = Field(gt=0.0, le=1.0, description="Factor applied after every epoch.")


class Cosine(_Schedule):
    name: Literal["cosine"]
    warmup_epochs: float = Field(ge=0.0, description="Linear warm-up length, in epochs (fractions allowed).")
    min_lr: float = Field(ge=0.0, description="The rate the cosine ends at.")


class OneCycle(_Schedule):
    name: Literal["onecycle"]
    pct_start: float = Field(gt=0.0, lt=1.0, description="Fraction of all steps spent rising to optimizer.lr.")
    div_factor: float = Field(gt=1.0, description="Start at optimizer.lr / div_factor.")
    final_div_factor: float = Field(gt=1.0, description="End at the start rate / final_div_factor.")


class Plateau(_Schedule):
    name: Literal["plateau"]
    factor: float = Field(gt=0.0, lt=1.0, description="Multiply the rate by this on a plateau.")
    patience: int = Field(ge=0, description="Epochs without a better validation loss before reducing.")
    threshold: float = Field(ge=0.0, description="Relative improvement that counts as better.")
    cooldown: int = Field(ge=0, description="Epochs to wait after a reduction before counting again.")
    min_lr: float = Field(ge=0.0)


ScheduleConfig = Annotated[
    Union[Constant, Step, MultiStep, Exponential, Cosine, OneCycle, Plateau], Field(discriminator="name")
]
SCHEDULES: Dict[str, type] = {
    "constant": Constant, "step": Step, "multistep": MultiStep, "exponential": Exponential, "cosine": Cosine,
    "onecycle": OneCycle, "plateau": Plateau,
}


@dataclass
class PlateauState:
    """What ``plateau`` remembers between epochs (saved in the training checkpoint)."""

    lr: float
    best: float = math.inf
    bad_epochs: int = 0
    cooldown_left: int = 0

    def to_dict(self) -> Dict:
        return asdict(self)


def learning_rate(schedule, base_lr: float, epoch: int, step: int, steps_per_epoch: int, epochs: int,
                  plateau: PlateauState | None = None) -> float:
    """The rate for ``step`` (0-based, within ``epoch``) of a run of ``epochs`` × ``steps_per_epoch`` steps."""
    name = schedule.name
    if name == "constant":
        return base_lr
    if name == "step":
        return base_lr * schedule.gamma ** (epoch // schedule.step_size)
    if name == "multistep":
        return base_lr * schedule.gamma ** bisect.bisect_right(schedule.milestones, epoch)
    if name == "exponential":
        return base_lr * schedule.gamma**epoch
    if name == "plateau":
        return plateau.lr if plateau is not None else base_lr
    position, total = epoch * steps_per_epoch + step, epochs * steps_per_epoch
    if name == "cosine":
        return _cosine(schedule, base_lr, position, total, round(schedule.warmup_epochs * steps_per_epoch))
    if name == "onecycle":
        return _one_cycle(schedule, base_lr, position, total)
    raise ValueError(f"unknown schedule {name!r}")


def _cosine(schedule: Cosine, base_lr: float, position: int, total: int, warmup: int) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps (lr·(s+1)/warmup), then cosine down to ``min_lr``."""
    if position < warmup:
        return base_lr * (position + 1) / warmup
    span = max(1, total - warmup)
    progress = min(position - warmup, span) / span
    return schedule.min_lr + (base_lr - schedule.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _one_cycle(schedule: OneCycle, max_lr: float, position: int, total: int) -> float:
    """PyTorch's OneCycleLR (two phases, cosine annealing), without momentum cycling."""
    initial = max_lr / schedule.div_factor
    final = initial / schedule.final_div_factor
    peak = float(schedule.pct_start * total) - 1
    phases = ((peak, initial, max_lr), (total - 1, max_lr, final))
    start = 0.0
    for end, lr_from, lr_to in phases:
        if position <= end or end == total - 1:
            progress = (position - start) / (end - start) if end > start else 1.0
            return lr_to + (lr_from - lr_to) / 2.0 * (math.cos(math.pi * progress) + 1.0)
        start = end
    raise AssertionError("unreachable")


def plateau_update(schedule: Plateau, state: PlateauState, val_loss: float) -> PlateauState:
    """PyTorch's ReduceLROnPlateau (mode 'min', relative threshold) after an epoch with ``val_loss``."""
    state = PlateauState(**state.to_dict())
    if val_loss < state.best * (1.0 - schedule.threshold):
        state.best, state.bad_epochs = val_loss, 0
    else:
        state.bad_epochs += 1
    if state.cooldown_left > 0:
        state.cooldown_left -= 1
        state.bad_epochs = 0
    if state.bad_epochs > schedule.patience:
        reduced = max(state.lr * schedule.factor, schedule.min_lr)
        if state.lr - reduced > 1e-8:  # torch's eps: smaller changes are ignored
            state.lr = reduced
        state.cooldown_left, state.bad_epochs = schedule.cooldown, 0
    return state


class LearningRate:
    """A schedule bound to one run: the rate at each step, and ``plateau``'s update after each epoch."""

    def __init__(self, schedule, base_lr: float, epochs: int):
        self.schedule, self.base_lr, self.epochs = schedule, base_lr, epochs

    def initial_state(self) -> Dict | None:
        """What a fresh run stores for the schedule (``plateau`` only)."""
        return PlateauState(self.base_lr).to_dict() if self.schedule.name == "plateau" else None

    def at(self, epoch: int, step: int, steps_per_epoch: int, state: Dict | None) -> float:
        plateau = PlateauState(**state) if state else None
        return learning_rate(self.schedule, self.base_lr, epoch, step, steps_per_epoch, self.epochs, plateau)

    def end_epoch(self, state: Dict | None, val_loss: float) -> Dict | None:
        if self.schedule.name != "plateau":
            return state
        return plateau_update(self.schedule, PlateauState(**state), val_loss).to_dict()


def check_schedule_can_run(schedule, dataset_cfg, validates: bool) -> None:
    """``plateau`` follows the validation loss: refuse it, before training, for data without a validation split."""
    from cnnrun.errors import ConfigError, Problem

    if schedule.name == "plateau" and not validates:
        raise ConfigError([Problem("schedule.name", (
            f"'plateau' reduces the rate when the validation loss stalls, but dataset={dataset_cfg.name} has no "
            f"validation split here (dataset.val_fraction={dataset_cfg.val_fraction}); set dataset.val_fraction > 0 "
            "or use a schedule that needs no validation: step, multistep, exponential, cosine, onecycle"))])


def validate_schedule(data: Dict) -> _Schedule:
    """The ``schedule`` group → its typed settings, or one ConfigError listing every problem."""
    from pydantic import ValidationError

    from cnnrun.errors import ConfigError, Problem, did_you_mean, one_of
    from cnnrun.spec.validation import problems_from

    data = dict(data or {"name": "constant"})
    name = data.get("name")
    cls = SCHEDULES.get(name)
    if cls is None:
        text = f"unknown schedule {name!r}{did_you_mean(name, SCHEDULES)}; available: {one_of(SCHEDULES)}"
        raise ConfigError([Problem("schedule.name", text)], f"schedule={name}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(problems_from(err, "schedule", cls), f"schedule={name}") from None
