"""cnnrun's TensorFlow and Keras training paths against hand-written references, measured side by side.

Four trainers of classic_cnn (batch 128, Adam lr 1e-3, eps 1e-7) on the bundled mnist_5k train split:

- ``tf_reference``: a hand-written TensorFlow 2 loop (tf.Variables, tf.nn ops, a ``tf.function`` over a
  GradientTape, Adam written with plain ops), written without cnnrun's compiler;
- ``cnnrun_tensorflow``: framework=tensorflow through ``cnnrun.backends.create_runner`` and cnnrun's real
  ``Trainer`` (its per-20-step metric syncs included; validation time excluded, as in the epoch table);
- ``keras_fit``: the same network as a Keras Sequential model trained by ``model.fit`` (its default
  ``jit_compile="auto"`` resolves to no XLA on a CPU-only machine, like cnnrun's default);
- ``cnnrun_keras``: framework=keras (TensorFlow backend) through the same runner and trainer.

Each trainer first runs one warm-up epoch (tracing), then the rounds alternate between them, one epoch each,
so that load from other processes hits all of them alike. Reported: median images/s over the rounds and the
ratios cnnrun_tensorflow / tf_reference (target ≥ 0.95) and cnnrun_keras / keras_fit (target ≥ 1.0).

Run, from the repository root: ``.venv/bin/python -m benchmarks.bench_tensorflow_keras --rounds 5``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np

import cnnrun.backends.tensorflow  # noqa: F401  (imports TensorFlow with its C++ start-up noise filtered)
from benchmarks.common import keras_classic_cnn
from cnnrun.backends import create_runner, framework_version, validate_options
from cnnrun.config import DatasetConfig, DeviceConfig, OptimizerConfig, TrainerConfig
from cnnrun.data import load_dataset
from cnnrun.data.pipeline import epoch_order, iterate_batches
from cnnrun.spec import compile_model
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Trainer, TrainState

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH, LR, EPS, SEED = 128, 1e-3, 1e-7, 0
CLASSIC_CNN = {
    "name": "classic_cnn",
    "layers": [
        {"type": "conv2d", "filters": 32, "kernel": 5, "stride": 1, "padding": "same", "activation": "relu"},
        {"type": "maxpool", "size": 2, "stride": 2},
        {"type": "conv2d", "filters": 64, "kernel": 5, "stride": 1, "padding": "same", "activation": "relu"},
        {"type": "maxpool", "size": 2, "stride": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 1024, "activation": "relu"},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}


class SilentView:
    """The trainer's progress view, doing nothing."""

    def start_epoch(self, *args): ...

    def update(self, *args): ...

    def end_epoch(self, row): ...

    def close(self): ...


# --------------------------------------------------------------------------------------------------- references


class TensorFlowReference:
    """classic_cnn by hand: variables, tf.nn ops, GradientTape, plain-op Adam. Knows nothing of cnnrun's spec."""

    def __init__(self, mean: float, std: float):
        rng = np.random.default_rng(SEED)

        def glorot(shape):
            receptive = int(np.prod(shape[:-2]))
            limit = np.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
            return rng.uniform(-limit, limit, shape).astype(np.float32)

        shapes = [(5, 5, 1, 32), (32,), (5, 5, 32, 64), (64,), (7 * 7 * 64, 1024), (1024,), (1024, 10), (10,)]
        self.params = [tf.Variable(glorot(s) if len(s) > 1 else np.zeros(s, np.float32)) for s in shapes]
        self.m = [tf.Variable(tf.zeros_like(p)) for p in self.params]
        self.v = [tf.Variable(tf.zeros_like(p)) for p in self.params]
        self.t = tf.Variable(0.0)
        self.mean, self.std = mean, std
        spec = [tf.TensorSpec((None, 28, 28, 1), tf.uint8), tf.TensorSpec((None,), tf.int64)]
        self.step = tf.function(self._step, input_signature=spec)

    def _forward(self, x):
        k1, b1, k2, b2, w3, b3, w4, b4 = self.params
        x = tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME") + b1)
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.nn.relu(tf.nn.conv2d(x, k2, 1, "SAME") + b2)
        x = tf.nn.max_pool2d(x, 2, 2, "VALID")
        x = tf.reshape(x, (-1, 7 * 7 * 64))
        x = tf.nn.relu(x @ w3 + b3)
        return x @ w4 + b4

    def _step(self, images, labels):
        x = (tf.cast(images, tf.float32) - self.mean) / self.std
        with tf.GradientTape() as tape:
            logits = self._forward(x)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, self.params)
        t = self.t.assign_add(1.0)
        lr_t = LR * tf.sqrt(1.0 - 0.999**t) / (1.0 - 0.9**t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.assign(0.9 * m + 0.1 * g)
            v.assign(0.999 * v + 0.001 * g * g)
            p.assign_sub(lr_t * m / (tf.sqrt(v) + EPS))
        return loss

    def epoch(self, split, epoch: int) -> int:
        loss = None
        for images, labels in iterate_batches(split, BATCH, epoch_order(len(split), SEED, epoch)):
            loss = self.step(images, labels)
        float(loss)  # wait for the last step
        return len(split)


class KerasFitReference:
    """The same network as a Keras Sequential model, trained with model.fit on pre-normalised float arrays."""

    def __init__(self, split, mean: float, std: float):
        self.model = keras_classic_cnn(keras, LR, EPS)
        self.x = ((split.images.astype(np.float32) - mean) / std)
        self.y = split.labels

    def epoch(self, split, epoch: int) -> int:
        timer = EpochTimer()
        self.model.fit(self.x, self.y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0, callbacks=[timer])
        self.last_images_per_s = len(split) / timer.seconds  # the epoch itself, not fit()'s per-call set-up
        return len(split)


class EpochTimer(keras.callbacks.Callback):
    """Seconds from on_epoch_begin to on_epoch_end (fit's own per-call set-up excluded, as for cnnrun)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.started


# --------------------------------------------------------------------------------------------------- cnnrun


class CnnrunTrainer:
    """A cnnrun runner driven by the real Trainer, one epoch per call."""

    def __init__(self, framework: str, options: Dict, dataset, threads=None, precision: str = "fp32"):
        compiled = compile_model(CLASSIC_CNN, (1, 28, 28), 10)
        optimizer = OptimizerConfig(name="adam", lr=LR, eps=EPS)
        self.runner = create_runner(
            framework, compiled, optimizer, validate_options(framework, options),
            DeviceConfig(name="cpu", threads=threads), SEED, dataset.mean, dataset.std, precision=precision,
        )
        self.cfg = TrainerConfig(batch_size=BATCH, seed=SEED, patience=None, progress=False)
        self.trainer = Trainer(self.runner, dataset, self.cfg, NullLogger(), SilentView(), lambda kind, s: None)
        self.state = TrainState()

    def epoch(self, split, epoch: int) -> int:
        self.trainer.cfg = self.cfg.model_copy(update={"epochs": self.state.epoch + 1})
        self.trainer.fit(self.state)
        self.last_images_per_s = self.state.history[-1]["images_per_s"]
        return len(split)


# --------------------------------------------------------------------------------------------------- main


def timed_epoch(trainer, split, epoch: int) -> float:
    """images/s of one epoch: the trainer's own figure for cnnrun (training time only), wall time otherwise."""
    started = time.perf_counter()
    n = trainer.epoch(split, epoch)
    seconds = time.perf_counter() - started
    return getattr(trainer, "last_images_per_s", None) or n / seconds


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured epochs per trainer (alternating)")
    parser.add_argument("--threads", type=int, default=None, help="device.threads for cnnrun (default: all)")
    parser.add_argument("--bf16", action="store_true", help="also time cnnrun with trainer.precision=bf16")
    args = parser.parse_args(argv)

    dataset = load_dataset(DatasetConfig(name="mnist_5k", num_classes=10, channels=1, image_size=(28, 28)))
    mean, std = dataset.mean[0], dataset.std[0]
    trainers: Dict[str, Callable] = {
        "tf_reference": TensorFlowReference(mean, std),
        "cnnrun_tensorflow": CnnrunTrainer("tensorflow", {"jit_compile": False}, dataset, args.threads),
        "keras_fit": KerasFitReference(dataset.train, mean, std),
        "cnnrun_keras": CnnrunTrainer("keras", {"backend": "tensorflow", "jit_compile": False}, dataset, args.threads),
    }
    if args.bf16:
        trainers["cnnrun_tensorflow_bf16"] = CnnrunTrainer("tensorflow", {"jit_compile": False}, dataset, args.threads,
                                                           precision="bf16")
        trainers["cnnrun_keras_bf16"] = CnnrunTrainer("keras", {"backend": "tensorflow", "jit_compile": False},
                                                      dataset, args.threads, precision="bf16")
    print(f"tensorflow {tf.__version__}, keras {framework_version('keras')}, {os.cpu_count()} CPUs; "
          f"classic_cnn, batch {BATCH}, {len(dataset.train)} images/epoch, {args.rounds} rounds", flush=True)
    for trainer in trainers.values():  # warm-up: tracing and first-touch costs
        timed_epoch(trainer, dataset.train, 0)
    results: Dict[str, List[float]] = {name: [] for name in trainers}
    for r in range(args.rounds):
        for name, trainer in trainers.items():
            results[name].append(timed_epoch(trainer, dataset.train, r + 1))
        print(f"round {r + 1}: " + "  ".join(f"{n} {v[-1]:,.0f}" for n, v in results.items()), flush=True)
    median = {name: statistics.median(values) for name, values in results.items()}
    print("\n| trainer | images/s (median) | min | max |\n|---|---:|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {median[name]:,.0f} | {min(values):,.0f} | {max(values):,.0f} |")
    comparisons = [
        ("cnnrun tensorflow / hand-written GradientTape loop", "cnnrun_tensorflow", "tf_reference", 0.95),
        ("cnnrun keras / keras model.fit", "cnnrun_keras", "keras_fit", 1.0),
    ]
    if args.bf16:
        comparisons += [("cnnrun tensorflow bf16 / fp32", "cnnrun_tensorflow_bf16", "cnnrun_tensorflow", 0.0),
                        ("cnnrun keras bf16 / fp32", "cnnrun_keras_bf16", "cnnrun_keras", 0.0)]
    print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for label, ours, theirs, target in comparisons:
        # Ratios of epochs measured back to back (same round) cancel most of the machine's load swings.
        paired = statistics.median(a / b for a, b in zip(results[ours], results[theirs]))
        print(f"{label}: {median[ours] / median[theirs]:.2f}x of medians, {paired:.2f}x median of per-round "
              f"ratios (target >= {target:.2f})")


if __name__ == "__main__":
    sys.exit(main())
