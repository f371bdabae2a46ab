"""The number a job returns to the sweep (``sweep.objective``, ``sweep.direction``), and ranking jobs by it.

The train task returns it; Hydra hands it to the sweeper (Optuna optimizes it) and the summary ranks jobs by it.
``sweep.objective`` names any metric a train run logs (``RUN_METRICS``); the default is ``kept_val_acc``, the
validation accuracy of the kept epoch: the weights in model.safetensors, the ones the test metrics measure.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, TypeVar

from cnnrun.errors import ConfigError, Problem, UserError, did_you_mean, one_of

T = TypeVar("T")

# What a train run logs. Each epoch (MLflow step = epoch number): EPOCH_METRICS. At the end: the test split's
# metrics, and the kept epoch's (1-based; the best by validation loss with trainer.restore_best, else the last).
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "images_per_s", "lr")
FINAL_METRICS = ("test_loss", "test_acc", "kept_epoch", "kept_val_loss", "kept_val_acc")
RUN_METRICS = EPOCH_METRICS + FINAL_METRICS
VALIDATION_METRICS = ("val_loss", "val_acc", "kept_val_loss", "kept_val_acc")  # not logged without a val split
DEFAULT_OBJECTIVE = "kept_val_acc"


def unknown_objective(name: str) -> Optional[str]:
    """Why ``name`` cannot be a sweep objective, or None when a train run logs it."""
    if name in RUN_METRICS:
        return None
    return f"a train run logs no metric '{name}'{did_you_mean(name, RUN_METRICS)}; available: {one_of(RUN_METRICS)}"


def check_objective_is_logged(cfg, validates: bool) -> None:
    """In a sweep job, before training: the objective must be a metric this run will log."""
    from cnnrun.sweep import job as sweep_job

    name = cfg.sweep.objective
    if validates or name not in VALIDATION_METRICS or sweep_job.current() is None:
        return
    available = [m for m in RUN_METRICS if m not in VALIDATION_METRICS]
    raise ConfigError([Problem("sweep.objective", (
        f"'{name}' is a validation metric, but dataset={cfg.dataset.name} has no validation split here "
        f"(dataset.val_fraction={cfg.dataset.val_fraction}); available: {one_of(available)}, "
        "or set dataset.val_fraction > 0"))])


def job_result(ctx, logger) -> float:
    """What the train task returns: the configured objective (kept on the sweep job for its record, too)."""
    from cnnrun.sweep import job as sweep_job

    metrics = dict(getattr(logger, "latest", {}))
    job = sweep_job.current()
    if job is None:  # a single run: nobody reads the value
        return float(metrics.get(ctx.cfg.sweep.objective, math.nan))
    job.metrics = {k: float(v) for k, v in metrics.items()}
    return job_objective(ctx.cfg, metrics)


def job_objective(cfg, metrics: Mapping[str, float]) -> float:
    """The configured objective out of the metrics the run logged (their latest values)."""
    name = cfg.sweep.objective
    if name not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise UserError(f"sweep.objective={name}: the run logged no metric of that name; it logged: {known}")
    return float(metrics[name])


def usable(value: Optional[float]) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def rank(items: Iterable[T], value, direction: str) -> List[T]:
    """Best first; items without a finite value last, in their original order."""
    items = list(items)
    scored = [i for i in items if usable(value(i))]
    rest = [i for i in items if not usable(value(i))]
    return sorted(scored, key=value, reverse=(direction == "maximize")) + rest
