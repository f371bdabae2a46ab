"""task=train: data → backend → shared trainer → test evaluation, all recorded in one MLflow run.

With ``trainer.devices > 1`` this command launches that many workers instead (:mod:`cnnrun.distributed.launch`);
each worker, like a process torchrun started, runs this task as one rank: every rank trains, validates and tests
its shards, and rank 0 alone prints, tracks and writes.
"""

from __future__ import annotations

import json
import shutil
import traceback
from typing import Dict

import yaml

from cnnrun import checkpoint as ckpt_io
from cnnrun.backends import load_backend
from cnnrun.config import flatten_for_logging
from cnnrun.data.feed import choose_feed
from cnnrun.distributed import launch
from cnnrun.distributed.session import join_world, parallel_runner
from cnnrun.errors import TrainingInterrupted, UserError
from cnnrun.plots import learning_curve
from cnnrun.progress import ProgressView, SilentView, console
from cnnrun.resume import load_for_resume
from cnnrun.schedules import LearningRate, check_schedule_can_run
from cnnrun.summary import summary_json, summary_text
from cnnrun.sweep.objective import check_objective_is_logged, job_result
from cnnrun.sweep.resume import skip_finished
from cnnrun.tasks.common import (
    ending_run, load_data, make_checkpoint, report_test, run_name, run_tags, write_text,
)
from cnnrun.trainer import Trainer, TrainState, evaluate
from cnnrun.tracking import NullLogger, start_run


def run(ctx) -> float:
    """Train; return the objective for sweeps (sweep.objective)."""
    cfg = ctx.cfg
    if launch.launches(cfg):
        from cnnrun.sweep import job as sweep_job

        return launch.run_workers(ctx, in_sweep=sweep_job.current() is not None)
    skipped = skip_finished(ctx)  # a sweep job whose config already has a FINISHED run: its objective, no training
    if skipped is not None:
        return skipped
    dataset = load_data(ctx)
    check_objective_is_logged(cfg, validates=len(dataset.val) > 0)
    check_schedule_can_run(ctx.schedule, cfg.dataset, validates=len(dataset.val) > 0)
    collective, device = join_world(cfg, len(dataset.train))  # one process: LOCAL and cfg.device
    try:
        result = _train_as_rank(ctx, dataset, collective, device)
    except TrainingInterrupted as stop:
        # Every rank stopped after the same step; the others wait here until rank 0 has ended the MLflow run, so
        # that a launcher reacting to the first exit cannot cut rank 0 short.
        collective.broadcast(None)
        traceback.clear_frames(stop.__traceback__)  # they hold the runner, which holds the world (close())
        collective.close()
        raise
    collective.close()  # _train_as_rank's runner is gone with its frame: nothing holds the world now
    return result


def _train_as_rank(ctx, dataset, collective, device) -> float:
    """This process's part of the run: build the runner, train, test; rank 0 tracks and writes."""
    cfg = ctx.cfg
    backend = load_backend(cfg.framework.name)
    runner = backend.create_runner(
        ctx.compiled, cfg.optimizer, ctx.framework_options, device, cfg.trainer.seed, dataset.mean, dataset.std,
        label_smoothing=cfg.trainer.label_smoothing, precision=cfg.trainer.precision,
    )
    version = backend.framework_version()
    resumed = None
    state = TrainState()
    if cfg.trainer.resume:
        resume_path, resumed = load_for_resume(ctx)
        runner.set_weights(resumed.weights)
        runner.set_training_state(resumed.training_state)
        state = TrainState.from_dict(resumed.progress)
        if collective.world.is_main:
            _carry_best(resume_path, ctx.output_dir / "checkpoints")
    runner = parallel_runner(runner, collective, cfg, ctx.compiled.num_classes)
    feed = choose_feed(cfg.dataset, runner, dataset)
    main = collective.world.is_main
    tags = {**run_tags(ctx, runner, version, "train"), "cnnrun.world_size": str(collective.world.size),
            "cnnrun.batches": feed.where}
    previous_run = resumed.origin.get("run_id") if resumed is not None else None
    logger = start_run(cfg.tracking, run_name(ctx, runner), tags, resume_run_id=previous_run) if main else NullLogger()
    with ending_run(logger, interrupts=(TrainingInterrupted,)):
        return _train(ctx, runner, dataset, feed, logger, version, state, resumed is not None, collective)


def _train(ctx, runner, dataset, feed, logger, version: str, state: TrainState, resuming: bool, collective
           ) -> float:
    cfg, out = ctx.cfg, ctx.output_dir
    world = collective.world
    checkpoints = out / "checkpoints"
    if not world.is_main:
        return _train_rank(ctx, runner, dataset, feed, logger, state, collective)
    if resuming:  # the run's params were logged when it started; MLflow params cannot change
        logger.set_tags({"cnnrun.resumed_from": cfg.trainer.resume, "cnnrun.resumed_at_epoch": state.epoch + 1})
    else:
        logger.log_params({**flatten_for_logging(_loggable(ctx.raw)), "world_size": world.size})
        logger.log_dataset(dataset)
    logger.log_artifact(write_text(out / "config.yaml", yaml.safe_dump(ctx.raw, sort_keys=False)))
    logger.log_artifact(write_text(out / "summary.txt", summary_text(ctx.compiled)))
    logger.log_artifact(write_text(out / "summary.json", summary_json(ctx.compiled)))
    origin = {
        "framework": cfg.framework.name,
        "framework_version": version,
        "device": runner.device_name,
        "run_id": logger.run_id,
        "dataset": dataset.name,
        "model": ctx.compiled.name,
    }

    def save(kind: str, state: TrainState) -> None:
        ckpt = make_checkpoint(ctx, runner, dataset, origin, state.to_dict(), training_state=(kind == "last"))
        ckpt_io.save(checkpoints / f"{kind}.safetensors", ckpt)

    ranks = f" × {world.size} processes" if world.size > 1 else ""
    held = ", images held on the device" if feed.where == "device" else ""
    console.print(
        f"[bold]{ctx.compiled.name}[/] on {dataset.name} ({len(dataset.train):,} train images{held}) with "
        f"{cfg.framework.name} {version} on {runner.device_name}{ranks}; run {logger.run_id or '(not tracked)'}"
    )
    state = _fit(ctx, runner, dataset, feed, logger, ProgressView(cfg.trainer.progress, cfg.trainer.epochs), save,
                 state, collective)
    restored = _restore_best(cfg, runner, checkpoints / "best.safetensors", collective)
    title = f"{ctx.compiled.name} / {cfg.framework.name}"
    test = report_test(ctx, runner, dataset, logger, title, feed=feed)
    logger.log_metrics(kept_epoch_metrics(state, restored))
    final = ckpt_io.save(
        out / "model.safetensors",
        make_checkpoint(ctx, runner, dataset, origin, state.to_dict(), training_state=False),
    )
    logger.log_artifact(final)
    logger.log_model(final)  # tracking.log_model: the checkpoint as an MLflow pyfunc model too
    logger.log_artifact(learning_curve(state.history, out / "learning_curve.png", title))
    console.print(
        f"test accuracy [bold]{test['test_acc']:.4f}[/] (loss {test['test_loss']:.4f}); "
        f"checkpoint {final}; outputs in {out}"
    )
    return job_result(ctx, logger)  # sweep.objective (default: kept_val_acc)


def _fit(ctx, runner, dataset, feed, logger, view, save, state: TrainState, collective) -> TrainState:
    cfg = ctx.cfg
    rate = LearningRate(ctx.schedule, cfg.optimizer.lr, cfg.trainer.epochs)
    trainer = Trainer(runner, dataset, cfg.trainer, logger, view, save, learning_rate=rate, collective=collective,
                      feed=feed)
    try:
        return trainer.fit(state, augment=cfg.dataset.augment)
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        half = max(1, cfg.trainer.batch_size // 2)
        raise UserError(
            f"out of memory on {runner.device_name} at trainer.batch_size={cfg.trainer.batch_size} "
            f"({type(err).__name__}); try trainer.batch_size={half} (the last good checkpoint is kept)"
        ) from None
    finally:
        view.close()


def _restore_best(cfg, runner, best, collective) -> bool:
    """Load the best checkpoint's weights when trainer.restore_best asks and one was written (by rank 0, which
    sends them to the other ranks); whether it did."""
    main = collective.world.is_main
    restored = collective.broadcast(cfg.trainer.restore_best and best.exists() if main else None)
    if restored:
        runner.set_weights(collective.broadcast(ckpt_io.load(best).weights if main else None))
    return restored


def _train_rank(ctx, runner, dataset, feed, logger, state: TrainState, collective) -> float:
    """A rank other than 0: the same training, validation and test steps (its shards of them), writing nothing."""
    cfg = ctx.cfg
    _fit(ctx, runner, dataset, feed, logger, SilentView(), lambda kind, state: None, state, collective)
    _restore_best(cfg, runner, None, collective)
    evaluate(runner, dataset.test, cfg.trainer.eval_batch_size, feed)  # rank 0's test report needs this rank's shards
    return float("nan")


def kept_epoch_metrics(state: TrainState, restored_best: bool) -> Dict[str, float]:
    """kept_epoch (1-based) and its validation metrics: the epoch whose weights are tested and saved as the model
    (the best by validation loss when they were restored, else the last), never another epoch's best value.
    Without a validation split, kept_epoch only."""
    kept = state.best_epoch if restored_best else state.history[-1]["epoch"]
    row = next(r for r in state.history if r["epoch"] == kept)
    metrics = {"kept_epoch": kept + 1, "kept_val_loss": row["val_loss"], "kept_val_acc": row["val_acc"]}
    return {k: v for k, v in metrics.items() if v is not None}


OUT_OF_MEMORY_MARKS = ("out of memory", "can't allocate memory", "failed to allocate", "oom when allocating")


def is_out_of_memory(err: BaseException) -> bool:
    """Device or host memory exhausted, in any framework's words (checked by name: no framework import)."""
    if isinstance(err, MemoryError) or "OutOfMemory" in type(err).__name__ or "ResourceExhausted" in type(err).__name__:
        return True
    text = str(err).lower()
    return any(mark in text for mark in OUT_OF_MEMORY_MARKS)


def _carry_best(resume_path, checkpoints) -> None:
    """The interrupted run's best checkpoint continues to count: copy it into this run's folder."""
    best = resume_path.parent / "best.safetensors"
    if best.is_file() and best.parent != checkpoints:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copy2(best, checkpoints / "best.safetensors")


def _loggable(raw):
    """The config as logged: residual and repeat bodies, shortcuts and overrides compacted to one JSON param each,
    so resnets stay a few dozen keys."""
    data = json.loads(json.dumps(raw, default=str))
    for layer in data.get("model", {}).get("layers", []):
        for key in ("layers", "shortcut", "overrides"):
            if isinstance(layer, dict) and isinstance(layer.get(key), (list, dict)):
                layer[key] = json.dumps(layer[key], separators=(",", ":"))
    return data
