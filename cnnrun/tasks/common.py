"""Pieces the train and eval tasks share: data loading, run naming and tags, checkpoints, final test report."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Type

import numpy as np

import cnnrun
from cnnrun import checkpoint as ckpt_io
from cnnrun.data import Dataset, load_dataset, split_record
from cnnrun.errors import UserError
from cnnrun.metrics import confusion_matrix, summarise
from cnnrun.spec import fmt_shape


def load_data(ctx) -> Dataset:
    dataset = load_dataset(ctx.cfg.dataset)
    expected = ctx.cfg.dataset.input_shape
    if tuple(dataset.input_shape) != tuple(expected):
        raise UserError(
            f"dataset={dataset.name} gives {fmt_shape(dataset.input_shape)} images but the config says "
            f"dataset.channels={expected[0]}, dataset.image_size=[{expected[1]}, {expected[2]}]"
        )
    return dataset


def run_name(ctx, runner) -> str:
    if ctx.cfg.tracking.run_name:
        return ctx.cfg.tracking.run_name
    device = runner.device_name.split(" ")[0]
    return f"{ctx.compiled.name}-{ctx.cfg.framework.name}-{device}"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(ctx, runner, version: str, task: str) -> Dict[str, str]:
    tags = {
        "cnnrun.task": task,
        "cnnrun.version": cnnrun.__version__,
        "cnnrun.framework": ctx.cfg.framework.name,
        "cnnrun.framework_version": version,
        "cnnrun.device": runner.device_name,
        "cnnrun.model": ctx.compiled.name,
        "cnnrun.dataset": ctx.cfg.dataset.name,
        "cnnrun.output_dir": str(ctx.output_dir),
        "cnnrun.config_hash": ctx.config_hash(),
        "cnnrun.overrides": " ".join(ctx.overrides),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def make_checkpoint(ctx, runner, dataset: Dataset, origin: Dict, progress: Dict, training_state: bool):
    return ckpt_io.Checkpoint(
        weights=runner.get_weights(),
        spec=ctx.compiled.spec,
        input_shape=ctx.compiled.input_shape,
        class_names=dataset.class_names,
        mean=dataset.mean,
        std=dataset.std,
        origin=origin,
        progress=progress,
        training_state=runner.get_training_state() if training_state else {},
        split=split_record(ctx.cfg.dataset),
    )


def report_test(ctx, runner, dataset: Dataset, logger, title: str, prefix: str = "test",
                logits: Optional[np.ndarray] = None, feed=None) -> Dict[str, float]:
    """Evaluate on the test split through ``feed`` (default: host batches), or take its ``logits`` when already
    computed; log test metrics and the confusion-matrix PNG; return the metrics."""
    from cnnrun.data.feed import HOST
    from cnnrun.plots import confusion_matrix_plot
    from cnnrun.trainer import evaluate

    if logits is None:
        loss, acc, predictions = evaluate(runner, dataset.test, ctx.cfg.trainer.eval_batch_size, feed or HOST)
    else:
        loss, acc, predictions = summarise([(logits, dataset.test.labels)])
    metrics = {f"{prefix}_loss": loss, f"{prefix}_acc": acc}
    logger.log_metrics(metrics)
    counts = confusion_matrix(dataset.test.labels, predictions, dataset.num_classes)
    np.savetxt(ctx.output_dir / "confusion_matrix.csv", counts, fmt="%d", delimiter=",")
    png = confusion_matrix_plot(counts, dataset.class_names, ctx.output_dir / "confusion_matrix.png",
                                f"{title}: test accuracy {acc:.4f}")
    logger.log_artifact(png)
    logger.log_artifact(ctx.output_dir / "confusion_matrix.csv")
    return metrics


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@contextlib.contextmanager
def ending_run(logger, interrupts: Tuple[Type[BaseException], ...]) -> Iterator[None]:
    """End ``logger``'s run with the block's outcome, so no run is ever left RUNNING: FINISHED when the block
    completes, KILLED (with the interrupt's message) for one of ``interrupts``, else FAILED with the error."""
    status, error = "FAILED", None
    try:
        yield
        status = "FINISHED"
    except interrupts as err:
        status, error = "KILLED", str(err) or "interrupted"
        raise
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        logger.end(status, error)
