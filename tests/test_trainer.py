"""The training loop's bookkeeping, exactly: epoch means, syncs, early stopping, checkpoints, interruption and resume.

The runner is tests/numpy_runner.py's (real learning, bit-reproducible, no framework), so these run in well under
a second; the same loop with every framework is exercised by tests/tasks/ and tests/backends/.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cnnrun.config import AugmentConfig, TrainerConfig
from cnnrun.data import Dataset, Split
from cnnrun.data.pipeline import epoch_order
from cnnrun.distributed.world import World
from cnnrun.errors import TrainingInterrupted
from cnnrun.metrics import summarise
from cnnrun.progress import ProgressView, SilentView
from cnnrun.schedules import LearningRate, validate_schedule
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Diverged, StopSignal, Trainer, TrainState, evaluate
from tests.numpy_runner import SignalAt, SoftmaxRegression, quadrant_dataset

STEPS = 8  # per epoch: 60 training images in batches of 8


class RecordingLogger(NullLogger):
    """NullLogger that also keeps every call, to compare what reached the tracker with the epoch table."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        self.calls.append((step, dict(metrics)))


class RecordingView(ProgressView):
    """The real (non-terminal) view, keeping what the progress bar was told."""

    def __init__(self, epochs):
        super().__init__(False, epochs)
        self.starts, self.updates = [], []

    def start_epoch(self, epoch, steps, done=0):
        super().start_epoch(epoch, steps, done)
        self.starts.append((epoch, steps, done))

    def update(self, steps_done, loss, acc, images_per_s):
        super().update(steps_done, loss, acc, images_per_s)
        self.updates.append((steps_done, loss, acc, images_per_s))


def _fit(epochs=2, patience=None, runner=None, dataset=None, state=None, augment=None, learning_rate=None, **trainer):
    """Train; returns what came out: state, runner, saved checkpoints, logger, view, error, wall seconds."""
    runner = runner or SoftmaxRegression(16, 4)
    saved = []  # (kind, the state as a checkpoint stores it, the runner's weights then)
    logger, view = RecordingLogger(), RecordingView(epochs)
    cfg = TrainerConfig(epochs=epochs, patience=patience, batch_size=8, eval_batch_size=16, log_every=3,
                        progress=False, **trainer)
    loop = Trainer(runner, dataset or quadrant_dataset(), cfg, logger, view,
                   lambda kind, s: saved.append((kind, s.to_dict(), runner.get_weights())), learning_rate)
    error, started = None, time.perf_counter()
    try:
        state = loop.fit(state, augment)
    except TrainingInterrupted as err:
        error = err
    return SimpleNamespace(state=state, runner=runner, saved=saved, logger=logger, view=view, error=error,
                           wall=time.perf_counter() - started)


def _assert_same_history(got, expected):
    """Equal epoch tables, timings aside; means to 1e-12 (a resumed epoch sums its losses in other groups)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds", "images_per_s"}:
            assert a[key] == (pytest.approx(b[key], rel=1e-12) if isinstance(b[key], float) else b[key]), key


def _epoch_means(runner, epoch):
    sums = runner.step_sums[epoch * STEPS : (epoch + 1) * STEPS]
    count = sum(n for _, _, n in sums)
    return sum(s for s, _, _ in sums) / count, sum(c for _, c, _ in sums) / count, count


def test_each_epoch_row_holds_the_exact_means_and_reaches_the_tracker():
    fit = _fit(epochs=2)
    state, runner, logger = fit.state, fit.runner, fit.logger
    assert [row["epoch"] for row in state.history] == [0, 1]
    for row in state.history:
        loss, acc, count = _epoch_means(runner, row["epoch"])
        assert row["train_loss"] == pytest.approx(loss, rel=1e-12) and row["train_acc"] == pytest.approx(acc)
        assert row["images_per_s"] == pytest.approx(count / row["seconds"]) and row["seconds"] > 0
    val_loss, val_acc, _ = evaluate(runner, quadrant_dataset().val, 16)  # the weights of the last epoch
    assert (state.history[-1]["val_loss"], state.history[-1]["val_acc"]) == (val_loss, val_acc)
    assert [step for step, _ in logger.calls] == [1, 2]
    for (_, metrics), row in zip(logger.calls, state.history):
        assert metrics == {"train_loss": row["train_loss"], "train_acc": row["train_acc"], "val_loss": row["val_loss"],
                           "val_acc": row["val_acc"], "epoch_seconds": row["seconds"],
                           "images_per_s": row["images_per_s"]}
    assert all(row["seconds"] <= fit.wall for row in state.history)
    # the epoch in progress is reset once it is recorded
    assert (state.epoch, state.batch, state.loss_sum, state.correct, state.count, state.seconds) == (2, 0, 0, 0, 0, 0)


def test_the_progress_view_shows_running_means_at_each_sync():
    fit = _fit(epochs=2)
    assert fit.view.starts == [(0, STEPS, 0), (1, STEPS, 0)]
    assert [u[0] for u in fit.view.updates] == [3, 6, 8, 3, 6, 8]
    for i, (done, loss, acc, images_per_s) in enumerate(fit.view.updates):
        epoch = i // 3
        sums = fit.runner.step_sums[epoch * STEPS : epoch * STEPS + done]
        count = sum(n for _, _, n in sums)
        assert loss == pytest.approx(sum(s for s, _, _ in sums) / count, rel=1e-12)
        assert acc == pytest.approx(sum(c for _, c, _ in sums) / count, rel=1e-12)
        assert count / fit.wall <= images_per_s < math.inf


def test_a_learnable_task_improves_every_epoch_and_keeps_each_as_best():
    fit = _fit(epochs=3)
    state, saved = fit.state, fit.saved
    losses = [row["val_loss"] for row in state.history]
    assert losses == sorted(losses, reverse=True) and state.best_val_loss == losses[-1]
    assert (state.best_epoch, state.bad_epochs, state.stopped_early) == (2, 0, False)
    assert [(kind, s["epoch"]) for kind, s, _ in saved] == [("best", 1), ("last", 1), ("best", 2), ("last", 2),
                                                             ("best", 3), ("last", 3)]
    assert state.history[-1]["train_acc"] > 0.9


def test_early_stopping_after_patience_epochs_without_improvement():
    fit = _fit(epochs=10, patience=2, dataset=quadrant_dataset(val_shift=1))
    state, saved = fit.state, fit.saved
    losses = [row["val_loss"] for row in state.history]
    assert len(losses) == 3 and losses[0] < losses[1] < losses[2]
    assert (state.epoch, state.best_epoch, state.bad_epochs, state.stopped_early) == (3, 0, 2, True)
    assert state.best_val_loss == losses[0]
    assert [(kind, s["epoch"]) for kind, s, _ in saved] == [("best", 1), ("last", 1), ("last", 2), ("last", 3)]


def test_an_equal_validation_loss_is_no_improvement():
    """A network that does not move (learning rate 0) repeats its validation loss: that is a plateau."""
    fit = _fit(epochs=10, patience=2, runner=SoftmaxRegression(16, 4, lr=0.0))
    assert len({row["val_loss"] for row in fit.state.history}) == 1
    assert (fit.state.epoch, fit.state.best_epoch, fit.state.stopped_early) == (3, 0, True)
    assert [kind for kind, _, _ in fit.saved].count("best") == 1


def test_each_epoch_visits_every_training_image_once_in_its_seeded_order():
    fit = _fit(epochs=2, seed=7)
    train = quadrant_dataset().train
    for epoch in range(2):
        seen = np.concatenate(fit.runner.labels_seen[epoch * STEPS : (epoch + 1) * STEPS])
        np.testing.assert_array_equal(seen, train.labels[epoch_order(len(train), 7, epoch)])
    assert not np.array_equal(epoch_order(len(train), 7, 0), epoch_order(len(train), 7, 1))


def test_time_is_accounted_across_interruptions():
    """An epoch interrupted twice: its row counts the seconds of every part, not just the last."""
    first = _fit(epochs=2, runner=SignalAt(16, 4, at=STEPS + 3, seconds=0.02))
    kind, progress, weights = first.saved[-1]
    assert progress["seconds"] >= 3 * 0.02

    def resume(progress, weights, at):
        runner = SignalAt(16, 4, at=at)
        runner.set_weights(weights)
        runner.set_training_state({"steps": np.array([progress["batch"] + STEPS])})
        return _fit(epochs=2, runner=runner, state=TrainState.from_dict(progress))

    second = resume(progress, weights, at=STEPS + 5)
    _, progress2, weights2 = second.saved[-1]
    assert progress2["batch"] == 5 and progress2["seconds"] >= progress["seconds"]
    third = resume(progress2, weights2, at=None)
    assert third.state.history[1]["seconds"] >= progress2["seconds"]
    assert third.state.history[1]["seconds"] <= first.wall + second.wall + third.wall


def test_without_patience_every_epoch_runs():
    state = _fit(epochs=4, patience=None, dataset=quadrant_dataset(val_shift=1)).state
    assert (state.epoch, state.best_epoch, state.bad_epochs, state.stopped_early) == (4, 0, 3, False)


def test_the_loop_syncs_every_log_every_steps_and_at_the_end_of_each_epoch():
    runner = _fit(epochs=2).runner
    assert runner.syncs == [3, 6, 8, 11, 14, 16]


def test_a_nan_loss_stops_training_naming_the_steps():
    runner = SoftmaxRegression(16, 4)
    runner.set_weights({"dense_0/kernel": np.full((4, 16), np.nan), "dense_0/bias": np.zeros(4)})
    with pytest.raises(Diverged) as err:
        _fit(runner=runner)
    assert str(err.value) == (
        "training diverged: the loss became nan in epoch 1, within steps 1-3; the last good checkpoint is kept. "
        "Try a smaller optimizer.lr (or batchnorm, or gradient-friendlier activations)"
    )


@pytest.mark.parametrize("at", [3 + STEPS, 4 + STEPS, STEPS], ids=["at-a-sync", "between-syncs", "last-step"])
def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(at):
    """Stopped by SIGINT during step ``at`` (augmented, so the per-batch seeding matters too), then continued from
    what the last checkpoint holds: the same epoch table and the same weights, to the bit."""
    augment = AugmentConfig(random_crop_padding=1, horizontal_flip=True, mixup_alpha=0.4)
    handler = signal.getsignal(signal.SIGINT)
    straight = _fit(epochs=3, augment=augment).runner
    interrupted = _fit(epochs=3, augment=augment, runner=SignalAt(16, 4, at=at))
    error, saved = interrupted.error, interrupted.saved
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is gone once it stops
    epoch, step = divmod(at, STEPS)
    if step:
        assert str(error) == f"stopped by SIGINT in epoch {epoch + 1} after step {step}/{STEPS}; state saved"
    else:
        assert str(error) == f"stopped by SIGINT at the end of epoch {epoch}; state saved"
    kind, progress, weights = saved[-1]
    assert kind == "last" and (progress["epoch"], progress["batch"]) == divmod(at, STEPS)
    assert progress["count"] == 8 * (at % STEPS)  # the steps since the last sync are counted too
    assert len(progress["history"]) == at // STEPS

    resumed = SoftmaxRegression(16, 4)
    resumed.set_weights(weights)
    fit = _fit(epochs=3, augment=augment, runner=resumed, state=TrainState.from_dict(progress))
    state = fit.state
    assert fit.view.starts[0] == (epoch, STEPS, step)  # the progress bar starts where the run stopped
    _assert_same_history(state.history, _fit(epochs=3, augment=augment).state.history)
    np.testing.assert_array_equal(resumed.kernel, straight.kernel)


def test_augmentation_changes_what_is_trained_on():
    plain = _fit(epochs=1).runner
    flipped = _fit(epochs=1, augment=AugmentConfig(horizontal_flip=True)).runner
    assert not np.array_equal(plain.kernel, flipped.kernel)
    off = _fit(epochs=1, augment=AugmentConfig()).runner
    np.testing.assert_array_equal(plain.kernel, off.kernel)


def test_max_time_stops_after_the_step_in_progress():
    fit = _fit(epochs=2, max_time=1e-9)
    runner, saved, error = fit.runner, fit.saved, fit.error
    assert str(error) == f"stopped by trainer.max_time in epoch 1 after step 1/{STEPS}; state saved"
    assert runner.steps == 1 and [kind for kind, _, _ in saved] == ["last"]


def test_a_second_ctrl_c_gives_up_at_once():
    handler = signal.getsignal(signal.SIGINT)
    with StopSignal(None) as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigterm_is_handled_like_ctrl_c():
    handler = signal.getsignal(signal.SIGTERM)
    with StopSignal(None) as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is handler


def test_outside_the_main_thread_only_the_time_budget_applies():
    results = []

    def work():
        with StopSignal(1e-9) as stop:
            results.append((stop.requested, stop.reason))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert results == [(True, "trainer.max_time")]  # and no error for the handlers it could not install


class ThreadRanks:
    """The ranks of one world as threads of this process, summing through a barrier: the one collective operation
    the loop uses (to agree on stopping). The engines' collectives across processes are tests/distributed/'s."""

    def __init__(self, size: int):
        self._barrier = threading.Barrier(size, timeout=30)  # a rank that never comes breaks it: no hang
        self._values = [None] * size
        self.collectives = [SimpleNamespace(world=World(rank, size, rank, size, "threads"),
                                            all_sum=lambda values, rank=rank: self._all_sum(rank, values))
                            for rank in range(size)]

    def _all_sum(self, rank, values):
        self._values[rank] = np.asarray(values, np.float64)
        self._barrier.wait()
        total = np.sum(self._values, axis=0)
        self._barrier.wait()  # every rank has read the sum before the next one is written
        return total


def test_a_stop_asked_of_one_rank_stops_every_rank_at_the_next_sync_after_the_same_step():
    """SIGINT during rank 0's step 4: both ranks go on to the sync after step 6 (log_every=3), agree to stop there
    and save; rank 1, which no signal reached, says why it stopped."""
    ranks = ThreadRanks(2)
    cfg = TrainerConfig(epochs=2, patience=None, batch_size=8, eval_batch_size=16, log_every=3, progress=False)
    saved, stopped = {0: [], 1: []}, {}

    def train(rank, runner):
        trainer = Trainer(runner, quadrant_dataset(), cfg, NullLogger(), SilentView(),
                          lambda kind, s: saved[rank].append((kind, s.epoch, s.batch)),
                          collective=ranks.collectives[rank])
        try:
            trainer.fit()
        except TrainingInterrupted as err:
            stopped[rank] = (str(err), runner.steps)

    other = threading.Thread(target=train, args=(1, SoftmaxRegression(16, 4)), daemon=True)
    other.start()
    train(0, SignalAt(16, 4, at=4))  # in the main thread, where the signal handlers are
    other.join(60)
    assert stopped == {0: (f"stopped by SIGINT in epoch 1 after step 6/{STEPS}; state saved", 6),
                       1: (f"stopped by another rank's stop request in epoch 1 after step 6/{STEPS}; state saved", 6)}
    assert saved == {0: [("last", 0, 6)], 1: [("last", 0, 6)]}


def test_a_time_budget_not_yet_spent_does_not_stop():
    with StopSignal(3600) as stop:
        assert not stop.requested and stop.reason is None


def test_evaluate_covers_the_whole_split_in_batches():
    runner = _fit(epochs=1).runner
    split = quadrant_dataset().val
    loss, acc, predictions = evaluate(runner, split, 16)  # 16 + 4
    expected = summarise([(runner.predict_logits(split.images), split.labels)])
    assert (loss, acc) == pytest.approx(expected[:2], rel=1e-12)
    np.testing.assert_array_equal(predictions, expected[2])


def test_train_state_round_trips_and_ignores_keys_it_does_not_know():
    state = TrainState(epoch=2, batch=3, loss_sum=1.5, best_val_loss=0.25, best_epoch=1, history=[{"epoch": 0}])
    assert TrainState.from_dict({**state.to_dict(), "from_a_newer_version": 1}) == state
    assert TrainState().best_val_loss == math.inf and TrainState().best_epoch == -1


def _schedule(settings, epochs=3):
    return LearningRate(validate_schedule(settings), 0.5, epochs)


def test_a_schedule_sets_the_rate_when_it_changes_and_the_epoch_logs_it():
    fit = _fit(epochs=3, learning_rate=_schedule({"name": "step", "step_size": 1, "gamma": 0.5}))
    assert fit.runner.rates_set == [(0, 0.5), (STEPS, 0.25), (2 * STEPS, 0.125)]
    assert [row["lr"] for row in fit.state.history] == [0.5, 0.25, 0.125]
    assert [metrics["lr"] for _, metrics in fit.logger.calls] == [0.5, 0.25, 0.125]
    plain = _fit(epochs=1)
    assert plain.runner.rates_set == [] and plain.state.history[0]["lr"] is None


def test_plateau_reduces_the_rate_and_its_state_survives_a_resume():
    plateau = {"name": "plateau", "factor": 0.5, "patience": 0, "threshold": 0.0, "cooldown": 0, "min_lr": 0.0}
    fit = _fit(epochs=3, dataset=quadrant_dataset(val_shift=1), learning_rate=_schedule(plateau))
    assert fit.runner.rates_set == [(0, 0.5), (2 * STEPS, 0.25)]  # epoch 2 was worse than epoch 1
    assert fit.state.schedule["lr"] == 0.125  # and epoch 3 than epoch 2
    _, after_two, weights = [entry for entry in fit.saved if entry[0] == "last"][1]
    assert after_two["schedule"]["lr"] == 0.25
    runner = SoftmaxRegression(16, 4)
    runner.set_weights(weights)
    resumed = _fit(epochs=3, dataset=quadrant_dataset(val_shift=1), learning_rate=_schedule(plateau), runner=runner,
                   state=TrainState.from_dict(after_two))
    assert runner.rates_set == [(0, 0.25)] and resumed.state.schedule == fit.state.schedule


def test_mixed_batches_reach_the_runner_with_their_partner_labels():
    fit = _fit(epochs=1, augment=AugmentConfig(mixup_alpha=0.4))
    assert len(fit.runner.mixes) == STEPS and all(0.0 <= lam <= 1.0 for lam in fit.runner.mixes)
    assert _fit(epochs=1, augment=AugmentConfig(horizontal_flip=True)).runner.mixes == []


def test_a_per_batch_schedule_sets_the_rate_before_every_step():
    fit = _fit(epochs=2, learning_rate=_schedule({"name": "cosine", "warmup_epochs": 0, "min_lr": 0.0}, epochs=2))
    steps, rates = zip(*fit.runner.rates_set)
    assert steps == tuple(range(2 * STEPS)) and rates[0] == 0.5
    assert all(a > b > 0 for a, b in zip(rates, rates[1:]))
    assert fit.state.history[1]["lr"] == rates[-1]


def test_without_a_validation_split_every_epoch_runs_and_only_last_is_kept():
    data = quadrant_dataset()
    no_val = Dataset(data.name, data.train, Split(data.val.images[:0], data.val.labels[:0]), data.test,
                     data.class_names, data.source)
    fit = _fit(epochs=3, patience=1, dataset=no_val)
    assert [(row["val_loss"], row["val_acc"]) for row in fit.state.history] == [(None, None)] * 3
    assert (fit.state.epoch, fit.state.best_epoch, fit.state.bad_epochs, fit.state.stopped_early) == (3, -1, 0, False)
    assert [kind for kind, _, _ in fit.saved] == ["last"] * 3
    assert all("val_loss" not in metrics and "val_acc" not in metrics for _, metrics in fit.logger.calls)
