"""How to feed the trainer: batches read from a memory-mapped cache and augmented, with no prefetch, with one
prefetch thread (cnnrun.data.pipeline.prefetched), and with grain (if importable: threads, and worker processes).

Each variant reads one epoch of the same batches, gathered from a memory map of random 64×64 RGB images and
augmented (crop with padding, flip) while the "training step" sleeps ``--step-ms`` (a step on an accelerator, or
one whose kernels release the GIL). Reported: seconds for the epoch, and what the step waited for data.

    python benchmarks/bench_loader.py [--images 20000] [--step-ms 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from cnnrun.config import AugmentConfig
from cnnrun.data import Split
from cnnrun.data.pipeline import num_batches, prefetched, training_batches
from cnnrun.data.rows import Rows

AUGMENT = AugmentConfig(random_crop_padding=4, horizontal_flip=True)
BATCH = 128


def epoch(stream, step_s: float):
    """(seconds for the epoch, seconds the step spent waiting for batches)."""
    waited, started = 0.0, time.perf_counter()
    it = iter(stream)
    while True:
        asked = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - asked
        time.sleep(step_s)
    return time.perf_counter() - started, waited


def grain_stream(split: Split, processes: int):
    import grain

    steps = num_batches(len(split), BATCH)

    def batch(i):  # one element per batch: keeps the vectorised gather and augmentation
        return next(training_batches(split, BATCH, seed=0, epoch=0, augment=AUGMENT, start_batch=int(i)))

    dataset = grain.MapDataset.range(steps).map(batch)
    if processes:
        return dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=processes))
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--step-ms", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        writer = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(args.images, 64, 64, 3))
        writer[:] = np.random.default_rng(0).integers(0, 256, writer.shape, dtype=np.uint8)
        writer.flush()
        del writer
        split = Split(Rows(np.load(path, mmap_mode="r")), np.zeros(args.images, np.int64))
        step_s = args.step_ms / 1000
        variants = {
            "inline (no prefetch)": lambda: training_batches(split, BATCH, 0, 0, AUGMENT),
            "one prefetch thread": lambda: prefetched(training_batches(split, BATCH, 0, 0, AUGMENT)),
        }
        try:
            import grain  # noqa: F401

            variants["grain, 2 threads"] = lambda: grain_stream(split, 0)
            variants["grain, 2 processes"] = lambda: grain_stream(split, 2)
        except ImportError:
            print("grain not importable: skipped")
        print(f"{args.images} images 64x64x3 memory-mapped, batch {BATCH}, step {args.step_ms} ms, "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        for name, make in variants.items():
            epoch(make(), step_s)  # warm the page cache and any worker start-up
            seconds, waited = min((epoch(make(), step_s) for _ in range(2)), key=lambda r: r[0])
            print(f"{name:24s} epoch {seconds:6.2f} s   step waited {waited:6.2f} s")


if __name__ == "__main__":
    main()
