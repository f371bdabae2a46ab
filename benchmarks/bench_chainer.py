"""cnnrun's Chainer training path against a hand-written Chainer loop for classic_cnn (batch 128, Adam), CPU.

Run: .venv/bin/python -m benchmarks.bench_chainer [--rounds 3] [--chunk 2] [--epochs] [--threads N] [--profile]
The reference is written without cnnrun's compiler, as a Chainer user would: a Chain of L.Convolution2D /
F.max_pooling_2d / L.Linear, chainer.optimizers.Adam, data preloaded as normalised float32 NCHW arrays, loss and
accuracy read per step. cnnrun's path is the real one: create_runner + runner.train_step on the uint8 batches
the Trainer hands over (with its periodic metrics sync). Both walk the same shuffled batches, taking turns every
--chunk batches, so the load of other processes on a shared machine falls on both alike; medians and the ratio
are printed. --epochs also alternates whole epochs through the real Trainer; --profile prints where one cnnrun
epoch spends its time (cProfile, top functions by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from typing import Dict, List

import numpy as np

from benchmarks.common import alternate, cnnrun_epoch_fn, images_per_second, mnist_5k, report
from cnnrun.backends.chainer_env import import_chainer, limit_cpu_threads

chainer = import_chainer()  # Chainer 7.8.1 needs the distutils fix to import at all (see chainer_env)
import chainer.functions as F  # noqa: E402
import chainer.links as L  # noqa: E402

BATCH = 128


class ClassicCNN(chainer.Chain):
    """conv5x5(32)-relu-maxpool2 → conv5x5(64)-relu-maxpool2 → dense(1024)-relu → dense(10)."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(1, 32, 5, pad=2)
            self.conv2 = L.Convolution2D(32, 64, 5, pad=2)
            self.fc1 = L.Linear(7 * 7 * 64, 1024)
            self.fc2 = L.Linear(1024, 10)

    def forward(self, x):
        h = F.max_pooling_2d(F.relu(self.conv1(x)), 2, 2, cover_all=False)
        h = F.max_pooling_2d(F.relu(self.conv2(h)), 2, 2, cover_all=False)
        return self.fc2(F.relu(self.fc1(h)))


def reference_loop(dataset):
    """The hand-written model, optimizer and one-step function; inputs preloaded as normalised float32 NCHW."""
    np.random.seed(0)  # Chainer's default initializers draw from NumPy's global generator
    model = ClassicCNN()
    optimizer = chainer.optimizers.Adam(alpha=1e-3, beta1=0.9, beta2=0.999, eps=1e-7)
    optimizer.setup(model)
    images = dataset.train.images.transpose(0, 3, 1, 2).astype(np.float32)
    x_all = (images - np.float32(dataset.mean[0])) / np.float32(dataset.std[0])
    y_all = dataset.train.labels.astype(np.int32)
    totals = {"loss": 0.0, "correct": 0}

    def step(idx: np.ndarray) -> None:
        x, t = x_all[idx], y_all[idx]
        y = model(x)
        loss = F.softmax_cross_entropy(y, t)
        model.cleargrads()
        loss.backward()
        optimizer.update()
        totals["loss"] += float(loss.array) * len(t)
        totals["correct"] += int((y.array.argmax(axis=1) == t).sum())

    return step


def reference_epoch_fn(dataset, batch_size: int = BATCH):
    """One epoch of the hand-written loop; returns its images/s."""
    step = reference_loop(dataset)
    rng = np.random.default_rng(0)

    def epoch() -> float:
        order = rng.permutation(len(dataset.train))
        batches = ((idx, idx) for idx in _split(order, batch_size))  # images_per_second counts len(batch[1])
        return images_per_second(lambda batch: step(batch[0]), batches, lambda: None)

    return epoch


def cnnrun_step_fn(dataset):
    """cnnrun's path for one batch: runner.train_step on the uint8 NHWC batch, as the Trainer hands it over."""
    from cnnrun.backends import ChainerOptions, create_runner
    from cnnrun.config import DeviceConfig, OptimizerConfig
    from cnnrun.spec import compile_model
    from tests.helpers import shipped_model

    model = compile_model(shipped_model("classic_cnn"), dataset.input_shape, 10)
    runner = create_runner("chainer", model, OptimizerConfig(name="adam", lr=1e-3), ChainerOptions(),
                           DeviceConfig(name="cpu"), 0, dataset.mean, dataset.std)
    images, labels = dataset.train.images, dataset.train.labels
    steps = {"n": 0}

    def step(idx: np.ndarray) -> None:
        runner.train_step(images.take(idx, axis=0), labels.take(idx))
        steps["n"] += 1
        if steps["n"] % 20 == 0:
            runner.train_metrics()  # the Trainer's log_every sync

    return step


def interleaved(dataset, rounds: int, chunk: int) -> Dict[str, List[float]]:
    """Both loops over the same batches, alternating every ``chunk`` batches (the order flips each time), so
    load from other processes on a shared machine falls on both alike. Returns images/s per chunk."""
    steps = {"reference hand-written Chainer loop": reference_loop(dataset), "cnnrun framework=chainer":
             cnnrun_step_fn(dataset)}
    rng = np.random.default_rng(0)
    results: Dict[str, List[float]] = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up: first-call allocations
        step(np.arange(BATCH))
    for _ in range(rounds):
        batches = _split(rng.permutation(len(dataset.train)), BATCH)
        for i in range(0, len(batches) - chunk + 1, chunk):
            group = batches[i : i + chunk]
            order = list(steps.items()) if (i // chunk) % 2 == 0 else list(reversed(steps.items()))
            for name, step in order:
                start = time.perf_counter()
                for idx in group:
                    step(idx)
                results[name].append(sum(map(len, group)) / (time.perf_counter() - start))
    return results


def _split(order: np.ndarray, batch_size: int) -> List[np.ndarray]:
    return np.array_split(order, range(batch_size, len(order), batch_size))


def profile_cnnrun_epoch(epoch_fn, top: int = 18) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    epoch_fn()
    profiler.disable()
    print("\nWhere one cnnrun framework=chainer epoch spends its time (cProfile, by own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="passes over the training split")
    parser.add_argument("--chunk", type=int, default=2, help="batches per turn in the interleaved comparison")
    parser.add_argument("--epochs", action="store_true", help="also alternate whole epochs through the Trainer")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads for both (default: all cores)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from cnnrun.backends import ChainerOptions

    limiter = limit_cpu_threads(args.threads)  # noqa: F841  (kept alive: the limit lasts while it exists)
    dataset = mnist_5k()
    threads = args.threads or len(os.sched_getaffinity(0))
    title = (f"classic_cnn training on mnist_5k, batch {BATCH}, Adam, Chainer {chainer.__version__}, "
             f"NumPy {np.__version__}, {threads} BLAS thread(s)")
    baseline, subject = "reference hand-written Chainer loop", "cnnrun framework=chainer"
    results = interleaved(dataset, args.rounds, args.chunk)
    print(f"\n{title}; taking turns every {args.chunk} batches ({len(results[baseline])} turns each)")
    print(f"{'variant':40s} {'median img/s':>13s} {'p10':>6s} {'p90':>6s}")
    for name, values in results.items():
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        print(f"{name:40s} {p50:13,.0f} {p10:6,.0f} {p90:6,.0f}")
    pairs = [b / a for a, b in zip(results[baseline], results[subject])]
    ratio = statistics.median(results[subject]) / statistics.median(results[baseline])
    print(f"ratio {subject} / {baseline}: {ratio:.3f} (medians); "
          f"{statistics.median(pairs):.3f} (median of side-by-side turn ratios)")
    if args.epochs or args.profile:
        cnnrun_epoch = cnnrun_epoch_fn("chainer", ChainerOptions(), dataset, threads=args.threads)
    if args.epochs:
        variants = {baseline + " (epochs)": reference_epoch_fn(dataset), subject + " (Trainer epochs)": cnnrun_epoch}
        report(f"{title}; whole epochs alternating", alternate(variants, args.rounds), *variants)
    if args.profile:
        profile_cnnrun_epoch(cnnrun_epoch)


if __name__ == "__main__":
    main()
