"""Training recipes through the trainer and the CLI: the rate a schedule sets at every step, exactly resumed
mid-schedule, and logged to MLflow with the optimizer, clipping and label-smoothing settings."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

from cnnrun.backends import TorchOptions, create_runner
from cnnrun.config import AugmentConfig, DeviceConfig, OptimizerConfig, TrainerConfig
from cnnrun.data import Dataset, Split, load_dataset
from cnnrun.errors import TrainingInterrupted
from cnnrun.progress import ProgressView
from cnnrun.schedules import LearningRate, validate_schedule
from cnnrun.spec import compile_model
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Trainer, TrainState
from tests.helpers import mlflow_runs, run_cli
from tests.tiny import TINY

SPEC = {
    "name": "small",
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel": 3, "stride": 2, "activation": "relu"},
        {"type": "batchnorm"},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}
SCHEDULES = {
    "cosine": {"name": "cosine", "warmup_epochs": 0.5, "min_lr": 1e-5},
    # patience 0 and an unreachable threshold: the rate is cut after every epoch, so a lost plateau state shows
    "plateau": {"name": "plateau", "factor": 0.5, "patience": 0, "threshold": 0.9, "cooldown": 0, "min_lr": 0.0},
}
EPOCHS, BATCH = 3, 40  # 8 steps per epoch on 300 images (the last batch of 20)
# Every augmentation on: each draws from the per-batch generator, which a resumed run must replay exactly.
AUGMENT = AugmentConfig(random_resized_crop=True, resized_crop_scale=(0.5, 1.0), random_crop_padding=2,
                        horizontal_flip=True, vertical_flip=True, mixup_alpha=0.4, cutmix_alpha=1.0)


class Recording:
    """A real torch runner that records the rate set before each step and the loss of each step; it can send
    itself SIGINT after a chosen step, which the trainer handles as a user's Ctrl-C."""

    def __init__(self, runner, interrupt_after: int = -1):
        self.runner, self.interrupt_after = runner, interrupt_after
        self.rates, self.losses, self.steps, self.mixed = [], [], 0, 0

    def set_learning_rate(self, lr: float) -> None:
        self.runner.set_learning_rate(lr)

    def train_step(self, images, labels, mix=None) -> None:
        self.rates.append(self.runner.learning_rate())
        self.mixed += mix is not None
        self.runner.train_step(images, labels, mix)
        self.steps += 1
        if self.steps == self.interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)

    def train_metrics(self):
        loss, acc, count = self.runner.train_metrics()
        self.losses.append(loss)
        return loss, acc, count

    def __getattr__(self, name):
        return getattr(self.runner, name)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    data = load_dataset(SimpleNamespace(name="mnist_5k", val_fraction=0.1, test_fraction=0.2, split_seed=0,
                                        num_classes=10))
    train = Split(data.train.images[:300], data.train.labels[:300])
    val = Split(data.val.images[:100], data.val.labels[:100])
    return Dataset("mnist_300", train, val, data.test, data.class_names, "test")


def _trainer(dataset, schedule, runner, saved):
    model = compile_model(SPEC, (1, 28, 28), 10)
    inner = create_runner("torch", model, OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, clip_norm=2.0),
                          TorchOptions(), DeviceConfig(name="cpu"), 0, dataset.mean, dataset.std,
                          label_smoothing=0.1)
    recording = Recording(inner, **runner)

    def save(kind, state):
        saved[kind] = (TrainState.from_dict(state.to_dict()), inner.get_weights(), inner.get_training_state())

    cfg = TrainerConfig(epochs=EPOCHS, batch_size=BATCH, patience=None, log_every=1, progress=False)
    rate = LearningRate(validate_schedule(SCHEDULES[schedule]), 0.05, EPOCHS)
    return Trainer(recording, dataset, cfg, NullLogger(), ProgressView(False, EPOCHS), save, learning_rate=rate)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("interrupt_after", [11, 8], ids=["mid-epoch-2", "epoch-boundary"])
def test_a_run_resumed_mid_schedule_sets_the_same_rates_and_ends_with_the_same_weights(
    dataset, schedule, interrupt_after
):
    straight_saved = {}
    straight = _trainer(dataset, schedule, {}, straight_saved)
    straight.fit(augment=AUGMENT)
    rates = straight.runner.rates
    assert straight.runner.mixed == EPOCHS * 8
    assert len(rates) == EPOCHS * 8 and len(set(rates)) >= 2  # the schedule moves the rate

    saved = {}
    first = _trainer(dataset, schedule, {"interrupt_after": interrupt_after}, saved)
    with pytest.raises(TrainingInterrupted):
        first.fit(augment=AUGMENT)
    state, weights, training_state = saved["last"]
    second = _trainer(dataset, schedule, {}, {})
    second.runner.set_weights(weights)
    second.runner.set_training_state(training_state)
    final = second.fit(state, augment=AUGMENT)

    assert first.runner.rates + second.runner.rates == rates
    np.testing.assert_array_equal(first.runner.losses + second.runner.losses, straight.runner.losses)
    assert [row["lr"] for row in final.history] == [row["lr"] for row in straight_saved["last"][0].history]
    resumed_weights, straight_weights = second.runner.get_weights(), straight.runner.get_weights()
    for name, value in straight_weights.items():
        np.testing.assert_array_equal(resumed_weights[name], value, err_msg=name)


@pytest.mark.slow
def test_the_cli_logs_the_scheduled_rate_and_the_recipe(workdir, tracking_uri):
    args = TINY + [f"tracking.uri={tracking_uri}", "trainer.epochs=3", "optimizer=adamw", "optimizer.lr=0.002",
                   "optimizer.clip_norm=1.0", "trainer.label_smoothing=0.1", "schedule=step",
                   "schedule.step_size=1", "schedule.gamma=0.5"]
    result = run_cli(args, workdir)
    assert result.returncode == 0, result.stderr
    client, (run,) = mlflow_runs(tracking_uri)
    history = client.get_metric_history(run.info.run_id, "lr")
    assert [(m.step, m.value) for m in history] == [(1, 0.002), (2, 0.001), (3, 0.0005)]
    params = run.data.params
    assert params["schedule.name"] == "step" and params["optimizer.name"] == "adamw"
    assert params["optimizer.clip_norm"] == "1.0" and params["trainer.label_smoothing"] == "0.1"


def test_bad_recipe_settings_are_reported_together(workdir):
    result = run_cli(TINY + ["schedule=cosine", "schedule.warmup_epochs=-1", "optimizer.clip_norm=0",
                             "trainer.label_smoothing=1.5", "optimizer.name=adamx"], workdir)
    assert result.returncode == 2
    for key in ("schedule.warmup_epochs", "optimizer.clip_norm", "trainer.label_smoothing", "optimizer.name"):
        assert key in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_plateau_without_a_validation_split_is_refused_before_training(workdir, tracking_uri):
    result = run_cli(TINY + [f"tracking.uri={tracking_uri}", "schedule=plateau", "dataset.val_fraction=0"], workdir)
    assert result.returncode == 2, result.stderr
    assert "schedule.name: 'plateau' reduces the rate when the validation loss stalls" in result.stderr
    assert "Traceback" not in result.stderr
    _, runs = mlflow_runs(tracking_uri)
    assert runs == []
