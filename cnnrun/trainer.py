"""One training loop for every framework.

The loop sees a :class:`~cnnrun.backends.Runner` and the batches a feed (:mod:`cnnrun.data.feed`) gives it. It syncs with the device every
``trainer.log_every`` steps (to show live metrics and catch divergence), never every step. It checkpoints after
each epoch, stops early on a plateau of validation loss, and on Ctrl-C, SIGTERM or ``trainer.max_time`` it
finishes the current step, saves its full state and raises :class:`TrainingInterrupted`. With several processes
(:mod:`cnnrun.distributed`) the runner takes global batches and answers for all ranks; a stop takes effect at the
next sync, when the ranks agree on it, so that every rank stops after the same step.

Without a validation split (``dataset.val_fraction=0``) there is nothing to choose an epoch by: every epoch
runs (no early stopping), no best checkpoint is written, no validation metric is logged, and the last epoch's
weights are the ones tested.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple


from cnnrun.data import Dataset, Split
from cnnrun.data.feed import HOST
from cnnrun.data.pipeline import num_batches
from cnnrun.distributed.collective import LOCAL, any_rank
from cnnrun.errors import TrainingInterrupted, UserError
from cnnrun.metrics import summarise
from cnnrun.schedules import LearningRate


class Diverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class EpochRow:
    epoch: int  # 0-based
    train_loss: float
    train_acc: float
    val_loss: Optional[float]  # None without a validation split
    val_acc: Optional[float]
    seconds: float
    images_per_s: float
    lr: Optional[float] = None  # the learning rate of the epoch's last step, when a schedule sets it


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped (stored in checkpoints)."""

    epoch: int = 0  # the epoch in progress (or next to start)
    batch: int = 0  # batches of that epoch already done
    loss_sum: float = 0.0  # of the epoch in progress, for its exact mean on resume
    correct: int = 0
    count: int = 0
    seconds: float = 0.0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    history: List[Dict] = field(default_factory=list)
    schedule: Optional[Dict] = None  # what a learning-rate schedule remembers between epochs (plateau's state)

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "TrainState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class StopSignal:
    """Turns SIGINT/SIGTERM and a time budget into a flag the loop checks between steps."""

    def __init__(self, max_time: Optional[float]):
        self.deadline = time.monotonic() + max_time if max_time else None
        self.reason: Optional[str] = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a parallel sweep worker): no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "trainer.max_time"
        return self.reason is not None


def evaluate(runner, split: Split, batch_size: int, feed=HOST):
    """(loss, accuracy, predictions) of the runner in inference mode over a whole split."""
    return summarise((runner.predict_logits(x), y) for x, y in feed.inference(split, batch_size))


class Trainer:
    def __init__(
        self,
        runner,
        dataset: Dataset,
        cfg,
        logger,
        view,
        save_checkpoint: Callable[[str, TrainState], None],
        learning_rate: Optional[LearningRate] = None,
        collective=LOCAL,
        feed=HOST,
    ):
        self.runner = runner
        self.feed = feed  # how batches reach the runner (cnnrun.data.feed): host batches, or gathered on the device
        self.collective = collective  # the other ranks, to agree on stopping (LOCAL: this process alone)
        self.dataset = dataset
        self.cfg = cfg
        self.logger = logger
        self.view = view
        self.save_checkpoint = save_checkpoint  # (kind: "last" | "best", state) → writes atomically
        self.learning_rate = learning_rate  # None: the optimizer's constant rate, never touched
        self._rate: Optional[float] = None  # the rate the runner has now (set only when it changes)

    def _set_rate(self, epoch: int, step: int, steps: int, state: TrainState) -> None:
        rate = self.learning_rate.at(epoch, step, steps, state.schedule)
        if rate != self._rate:
            self.runner.set_learning_rate(rate)
            self._rate = rate

    def fit(self, state: Optional[TrainState] = None, augment=None) -> TrainState:
        state = state or TrainState()
        if self.learning_rate is not None and state.schedule is None:
            state.schedule = self.learning_rate.initial_state()
        with StopSignal(self.cfg.max_time) as stop:
            while state.epoch < self.cfg.epochs and not state.stopped_early:
                row = self._train_epoch(state, stop, augment)
                self._end_epoch(state, row)
        return state

    def _train_epoch(self, state: TrainState, stop: StopSignal, augment) -> EpochRow:
        cfg, train = self.cfg, self.dataset.train
        epoch = state.epoch
        steps = num_batches(len(train), cfg.batch_size)
        self.view.start_epoch(epoch, steps, state.batch)
        started = time.perf_counter()
        since_sync = 0
        stopping = False
        # in the epoch's seeded order, augmented with per-batch seeds (exact on resume), prepared ahead of the step
        for images, labels, mix in self.feed.training(train, cfg.batch_size, cfg.seed, epoch, augment, state.batch):
            if self.learning_rate is not None:
                self._set_rate(epoch, state.batch, steps, state)
            self.runner.train_step(images, labels, mix)
            state.batch += 1
            since_sync += 1
            at_sync = since_sync == cfg.log_every or state.batch == steps
            stopping = self._stopping(stop, at_sync)
            if at_sync or stopping:
                self._sync(state, started, since_sync)
                since_sync = 0
            if stopping and state.batch < steps:
                state.seconds += time.perf_counter() - started
                self.save_checkpoint("last", state)
                raise TrainingInterrupted(
                    f"stopped by {stop.reason} in epoch {epoch + 1} after step {state.batch}/{steps}; "
                    "state saved"
                )
        state.seconds += time.perf_counter() - started
        val_loss, val_acc = self._validate()
        row = EpochRow(
            epoch=epoch,
            train_loss=state.loss_sum / state.count,
            train_acc=state.correct / state.count,
            val_loss=val_loss,
            val_acc=val_acc,
            seconds=state.seconds,
            images_per_s=state.count / state.seconds if state.seconds else float("nan"),
            lr=self._rate,
        )
        if stopping:  # interrupted on the epoch's last step: finish the epoch's bookkeeping first
            self._end_epoch(state, row)
            raise TrainingInterrupted(f"stopped by {stop.reason} at the end of epoch {epoch + 1}; state saved")
        return row

    def _stopping(self, stop: StopSignal, at_sync: bool) -> bool:
        """Whether to stop after this step: one process stops at once; ranks stop together, at a sync point,
        when any of them was asked to."""
        if self.collective.world.size == 1:
            return stop.requested
        if not at_sync or not any_rank(self.collective, stop.requested):
            return False
        stop.reason = stop.reason or "another rank's stop request"
        return True

    @property
    def validates(self) -> bool:
        return len(self.dataset.val) > 0

    def _validate(self) -> Tuple[Optional[float], Optional[float]]:
        if not self.validates:
            return None, None
        loss, acc, _ = evaluate(self.runner, self.dataset.val, self.cfg.eval_batch_size, self.feed)
        return loss, acc

    def _sync(self, state: TrainState, started: float, steps: int) -> None:
        loss, acc, count = self.runner.train_metrics()
        if not math.isfinite(loss):
            raise Diverged(
                f"training diverged: the loss became {loss} in epoch {state.epoch + 1}, within steps "
                f"{state.batch - steps + 1}-{state.batch}; the last good checkpoint is kept. "
                "Try a smaller optimizer.lr (or batchnorm, or gradient-friendlier activations)"
            )
        state.loss_sum += loss * count
        state.correct += round(acc * count)
        state.count += count
        elapsed = state.seconds + time.perf_counter() - started
        self.view.update(state.batch, state.loss_sum / state.count, state.correct / state.count, state.count / elapsed)

    def _end_epoch(self, state: TrainState, row: EpochRow) -> None:
        self.view.end_epoch(row)
        state.history.append(asdict(row))
        metrics = {
            "train_loss": row.train_loss,
            "train_acc": row.train_acc,
            "val_loss": row.val_loss,
            "val_acc": row.val_acc,
            "epoch_seconds": row.seconds,
            "images_per_s": row.images_per_s,
        }
        if row.lr is not None:
            metrics["lr"] = row.lr
        self.logger.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=row.epoch + 1)
        if self.learning_rate is not None:
            state.schedule = self.learning_rate.end_epoch(state.schedule, row.val_loss)
        improved = row.val_loss is not None and row.val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = row.val_loss, row.epoch, 0
        elif row.val_loss is not None:
            state.bad_epochs += 1
        patience = self.cfg.patience
        state.stopped_early = patience is not None and state.bad_epochs >= patience
        state.epoch += 1
        state.batch, state.loss_sum, state.correct, state.count, state.seconds = 0, 0.0, 0, 0, 0.0
        if improved:
            self.save_checkpoint("best", state)
        self.save_checkpoint("last", state)
