"""task=eval: test a checkpoint from any framework in any framework, recorded as its own MLflow run.

    cnnrun task=eval checkpoint=outputs/…/model.safetensors framework=keras

The model comes from the checkpoint (its stored spec, validated like a user's), not from ``model=``; the
dataset comes from the config and must give the images and classes the checkpoint was trained on. Inputs are
normalised with the checkpoint's own mean and std, as in training. Besides the test metrics and confusion matrix,
``test_predictions.csv`` holds every test image's predicted class and class probabilities.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Dict

import numpy as np

from cnnrun import checkpoint as ckpt_io
from cnnrun.backends import load_backend
from cnnrun.data import Dataset, split_record
from cnnrun.data.feed import HostFeed
from cnnrun.errors import UserError
from cnnrun.metrics import softmax
from cnnrun.progress import console
from cnnrun.spec import CompiledModel, compile_model, fmt_shape
from cnnrun.tasks.common import ending_run, load_data, report_test, run_tags, write_text
from cnnrun.tracking import start_run


def run(ctx) -> float:
    """Evaluate ``checkpoint=`` on the test split; return the test accuracy."""
    cfg = ctx.cfg
    path = Path(cfg.checkpoint)  # set: cnnrun.preflight checked that task=eval has one
    ckpt = ckpt_io.load_setting("checkpoint", cfg.checkpoint, path)
    compiled = load_model(ckpt, path)
    _check_dataset_config(cfg.dataset, ckpt, path)
    ctx = dataclasses.replace(ctx, compiled=compiled)  # tags, titles and reports name the checkpoint's model
    dataset = load_data(ctx)
    _check_split(cfg.dataset, dataset, ckpt, path)
    if tuple(dataset.class_names) != tuple(ckpt.class_names):
        raise UserError(
            f"checkpoint {path} was trained on classes {_names(ckpt.class_names)} but dataset={dataset.name} has "
            f"{_names(dataset.class_names)}; evaluate it on the dataset it was trained on"
        )
    backend = load_backend(cfg.framework.name)
    runner = backend.create_runner(
        compiled, cfg.optimizer, ctx.framework_options, cfg.device, cfg.trainer.seed, ckpt.mean, ckpt.std,
        precision=cfg.trainer.precision,
    )
    runner.set_weights(ckpt.weights)
    version = backend.framework_version()
    logger = start_run(cfg.tracking, _run_name(ctx, runner), {**run_tags(ctx, runner, version, "eval"),
                                                              **checkpoint_tags(ckpt, path)})
    with ending_run(logger, interrupts=(KeyboardInterrupt,)):
        return _evaluate(ctx, runner, dataset, logger, ckpt, path, version)


def load_model(ckpt: ckpt_io.Checkpoint, path: Path) -> CompiledModel:
    """The checkpoint's model: its stored spec compiled exactly like a user's, and its tensors checked."""
    compiled = compile_model(ckpt.spec, tuple(ckpt.input_shape), len(ckpt.class_names), f"checkpoint {path}")
    ckpt_io.check_matches(ckpt, compiled.weight_shapes(), path)
    return compiled


def _check_dataset_config(dataset_cfg, ckpt: ckpt_io.Checkpoint, path: Path) -> None:
    """The configured dataset must give the images and number of classes the model was built for."""
    problems = []
    if tuple(dataset_cfg.input_shape) != tuple(ckpt.input_shape):
        problems.append(f"{fmt_shape(ckpt.input_shape)} images (dataset={dataset_cfg.name} gives "
                        f"{fmt_shape(dataset_cfg.input_shape)})")
    if dataset_cfg.num_classes != len(ckpt.class_names):
        problems.append(f"{len(ckpt.class_names)} classes (dataset={dataset_cfg.name} has {dataset_cfg.num_classes})")
    if problems:
        raise UserError(
            f"checkpoint {path} expects " + " and ".join(problems) + "; choose the dataset it was trained on "
            "(its origin: " + ", ".join(f"{k}={v}" for k, v in ckpt.origin.items() if k in ("dataset", "framework"))
            + ")"
        )


def _check_split(dataset_cfg, dataset: Dataset, ckpt: ckpt_io.Checkpoint, path: Path) -> None:
    """Refuse a test split carved differently from training's: it would hold images the model trained on."""
    trained = ckpt.split
    if not trained:  # written before checkpoints stored their split: nothing to compare
        console.print(f"[yellow]checkpoint {path} does not record its dataset split; make sure dataset.split_seed "
                      "and the fractions are the ones it was trained with[/]")
        return
    if not dataset.test_is_carved or trained.get("dataset") != dataset.name:
        return  # a test split of its own files (or another dataset): training's split cannot leak into it
    here = split_record(dataset_cfg)
    differ = [key for key in here if key != "dataset" and key in trained and trained[key] != here[key]]
    if differ:
        given = ", ".join(f"dataset.{key}={here[key]}" for key in differ)
        wanted = " ".join(f"dataset.{key}={trained[key]}" for key in differ)
        raise UserError(
            f"checkpoint {path} was trained on a different split of dataset={dataset.name} than {given} makes; "
            f"its test split is carved from the same images, so it would test on training images. "
            f"Evaluate with {wanted}"
        )


def checkpoint_tags(ckpt: ckpt_io.Checkpoint, path: Path) -> Dict[str, str]:
    """Where the evaluated weights came from: cnnrun.checkpoint.* and cnnrun.checkpoint.origin.* tags."""
    tags = {"cnnrun.checkpoint": str(path.resolve())}
    tags.update({f"cnnrun.checkpoint.origin.{key}": str(value) for key, value in ckpt.origin.items()})
    if "epoch" in ckpt.progress:
        tags["cnnrun.checkpoint.epochs_trained"] = str(ckpt.progress["epoch"])
    return tags


def _run_name(ctx, runner) -> str:
    if ctx.cfg.tracking.run_name:
        return ctx.cfg.tracking.run_name
    return f"{ctx.compiled.name}-eval-{ctx.cfg.framework.name}-{runner.device_name.split(' ')[0]}"


def write_test_predictions(path: Path, dataset, probabilities) -> Path:
    """Per test image: its index in the split, true and predicted class, and every class's probability."""
    rows = [["index", "label", "predicted"] + [f"probability_{name}" for name in dataset.class_names]]
    for index, (label, probs) in enumerate(zip(dataset.test.labels, probabilities)):
        names = dataset.class_names
        rows.append([index, names[label], names[int(probs.argmax())]] + [repr(float(p)) for p in probs])
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return write_text(path, out.getvalue())


def _names(names) -> str:
    shown = ", ".join(names[:5])
    return f"[{shown}{', …' if len(names) > 5 else ''}]"


def _evaluate(ctx, runner, dataset, logger, ckpt: ckpt_io.Checkpoint, path: Path, version: str) -> float:
    cfg = ctx.cfg
    logger.log_params({"checkpoint": str(path), "framework": cfg.framework.name, "dataset": dataset.name,
                       "model": ctx.compiled.name, "device": cfg.device.name})
    logger.log_dataset(dataset)
    trained_with = ckpt.origin.get("framework", "an unknown framework")
    console.print(
        f"[bold]{ctx.compiled.name}[/] trained with {trained_with} ({path}), evaluated on {dataset.name} "
        f"({len(dataset.test):,} test images) with {cfg.framework.name} {version} on {runner.device_name}; "
        f"run {logger.run_id or '(not tracked)'}"
    )
    # read (and on a GPU copied there) on the prefetch thread, ahead of each prediction
    test_batches = HostFeed(runner.stage).inference(dataset.test, cfg.trainer.eval_batch_size)
    logits = np.concatenate([runner.predict_logits(images) for images, _ in test_batches])
    test = report_test(ctx, runner, dataset, logger, f"{ctx.compiled.name} / {cfg.framework.name} (eval)",
                       logits=logits)
    logger.log_artifact(write_test_predictions(ctx.output_dir / "test_predictions.csv", dataset, softmax(logits)))
    console.print(f"test accuracy [bold]{test['test_acc']:.4f}[/] (loss {test['test_loss']:.4f})")
    return test["test_acc"]
