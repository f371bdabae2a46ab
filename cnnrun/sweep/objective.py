"""The number a job returns to the sweep (``sweep.objective``, ``sweep.direction``), and ranking jobs by it.

The train task returns it; Hydra hands it to the sweeper (Optuna optimizes it) and the summary ranks jobs by it.
``sweep.objective`` names any metric the run logs: best_val_acc (the default: the best epoch's validation
accuracy), test_acc, test_loss, val_loss (the last epoch's)...
"""

from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, TypeVar

from cnnrun.errors import UserError

T = TypeVar("T")

# The metrics a train run logs (cnnrun.trainer per epoch, cnnrun.tasks.train and .common at the end): what
# sweep.objective may name, checked before any job runs.
METRICS = (
    "best_val_acc", "best_epoch", "test_acc", "test_loss", "train_loss", "train_acc", "val_loss", "val_acc",
    "epoch_seconds", "images_per_s", "lr",
)


def job_result(ctx, logger, best_val_acc: float) -> float:
    """What the train task returns: the configured objective (kept on the sweep job for its record, too)."""
    from cnnrun.sweep import job as sweep_job

    metrics = {**getattr(logger, "latest", {}), "best_val_acc": float(best_val_acc)}
    job = sweep_job.current()
    if job is None:  # a single run: nobody reads the value, so a misnamed objective is no error here
        return float(metrics.get(ctx.cfg.sweep.objective, best_val_acc))
    job.metrics = {k: float(v) for k, v in metrics.items()}
    return job_objective(ctx.cfg, metrics, best_val_acc)


def job_objective(cfg, metrics: Mapping[str, float], best_val_acc: float) -> float:
    """The configured objective out of the metrics the run logged (their latest values)."""
    name = cfg.sweep.objective
    if name == "best_val_acc":
        return float(best_val_acc)
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
