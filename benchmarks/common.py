"""Shared by the benchmarks: the bundled data, alternating rounds, medians and the printed table."""

from __future__ import annotations

import os
import platform
import statistics
import time
from types import SimpleNamespace
from typing import Callable, Dict, List

import numpy as np


def mnist_5k():
    from cnnrun.data import load_dataset

    return load_dataset(SimpleNamespace(name="mnist_5k", val_fraction=0.1, test_fraction=0.2, split_seed=0,
                                        num_classes=10))


def cnnrun_epoch_fn(framework: str, options, dataset, batch_size: int = 128, threads=None,
                    precision: str = "fp32", device: str = "cpu", on_device: bool = False,
                    model="classic_cnn") -> "CnnrunEpochs":
    """One epoch of cnnrun's real training path (runner + shared Trainer) per call; returns images/s of that epoch.

    ``on_device``: the feed cnnrun chooses for ``dataset.on_device=true`` (batches gathered from the splits held on
    the runner's device; what ``auto`` gives on a GPU), else for ``false`` (host batches, staged by the runner).
    ``model``: a shipped model's name or a spec as plain data.
    """
    return CnnrunEpochs(framework, options, dataset, batch_size, threads, precision, device, on_device, model)


class CnnrunEpochs:
    """See :func:`cnnrun_epoch_fn`; also says what the last epoch trained, for checks against a reference."""

    def __init__(self, framework, options, dataset, batch_size, threads, precision, device, on_device, model):
        from cnnrun.backends import create_runner
        from cnnrun.config import DatasetConfig, DeviceConfig, OptimizerConfig, TrainerConfig
        from cnnrun.data.feed import choose_feed
        from cnnrun.progress import ProgressView
        from cnnrun.schedules import Constant, LearningRate
        from cnnrun.spec import compile_model
        from cnnrun.tracking import NullLogger
        from cnnrun.trainer import Trainer, TrainState
        from tests.helpers import shipped_model

        spec = shipped_model(model) if isinstance(model, str) else model
        compiled = compile_model(spec, dataset.input_shape, dataset.num_classes)
        self.runner = create_runner(framework, compiled, OptimizerConfig(name="adam", lr=1e-3), options,
                                    DeviceConfig(name=device, threads=threads), 0, dataset.mean, dataset.std,
                                    precision=precision)
        self.state = TrainState()
        self.cfg = TrainerConfig(epochs=10**6, batch_size=batch_size, patience=None, progress=False)
        height, width, channels = dataset.train.images.shape[1:]
        dataset_cfg = DatasetConfig(name=dataset.name, num_classes=dataset.num_classes, channels=channels,
                                    image_size=(height, width), on_device=on_device)
        feed = choose_feed(dataset_cfg, self.runner, dataset)
        # the constant learning-rate schedule a real run has (set only when the rate changes)
        rate = LearningRate(Constant(), 1e-3, self.cfg.epochs)
        self.trainer = Trainer(self.runner, dataset, self.cfg, NullLogger(), ProgressView(False, 1),
                               lambda kind, s: None, learning_rate=rate, feed=feed)

    def __call__(self) -> float:
        self.trainer.cfg = self.cfg.model_copy(update={"epochs": self.state.epoch + 1})
        self.trainer.fit(self.state)
        return self.state.history[-1]["images_per_s"]

    @property
    def last_epoch_images(self) -> int:
        """Training images of the last epoch: the Trainer's images/s times its seconds."""
        row = self.state.history[-1]
        return round(row["images_per_s"] * row["seconds"])

    def parameter_count(self) -> int:
        return sum(int(np.prod(w.shape)) for w in self.runner.get_weights().values())


def keras_classic_cnn(keras, lr: float = 1e-3, eps: float = 1e-7):
    """classic_cnn as a Keras Sequential model compiled for ``model.fit`` (Adam, cross-entropy on logits, accuracy):
    the Keras references' network, written without cnnrun's compiler. ``keras`` is passed in: the caller chose its
    backend before importing it."""
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=eps),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def alternate(variants: Dict[str, Callable[[], float]], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run every variant once per round, in turn, so machine noise hits them alike; return images/s lists."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    results: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def report(title: str, results: Dict[str, List[float]], baseline: str, subject: str) -> None:
    print(f"\n{title}  ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{_cores()} cores)")
    print(f"{'variant':44s} {'median img/s':>13s} {'runs':>30s}")
    for name, values in results.items():
        runs = " ".join(f"{v:,.0f}" for v in values)
        print(f"{name:44s} {statistics.median(values):13,.0f} {runs:>30s}")
    ratio = statistics.median(results[subject]) / statistics.median(results[baseline])
    print(f"ratio {subject} / {baseline}: {ratio:.3f}")
    print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def paired_ratio(results: Dict[str, List[float]], ours: str, theirs: str) -> float:
    """The median of per-round ratios: epochs measured back to back cancel most of the machine's load swings."""
    return statistics.median(a / b for a, b in zip(results[ours], results[theirs]))


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def images_per_second(step: Callable[[np.ndarray], None], batches, sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    n = 0
    for batch in batches:
        step(batch)
        n += len(batch[1])
    sync()
    return n / (time.perf_counter() - start)
