"""The Python time cnnrun adds to every training step, against a hand-written PyTorch loop, measurable on a CPU.

Run: .venv/bin/python -m benchmarks.bench_overhead [--rounds 7]
On a fast GPU, a small network's step (classic_cnn at batch 128 on an H200: about 2 ms) is bound by how fast the
host issues its kernels, not by the GPU's arithmetic: whatever Python time the loop adds per step is time the GPU
waits. This measures that time without a GPU: a model so small (a 16→2 dense layer, batch 8, one thread) that a
step is nearly all dispatch, trained by cnnrun's real path (runner + shared Trainer, batches held and gathered with
dataset.on_device's DeviceFeed, or host batches from the prefetch thread) and by the hand-written loop a GPU
benchmark uses (normalised data held as a tensor, fused Adam, no metrics). Rounds alternate; medians of µs/step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import alternate, cnnrun_epoch_fn, paired_ratio

IMAGES, BATCH = 4096, 8


def tiny_dataset():
    from cnnrun.data import Dataset, Split

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split(rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), rng.integers(0, 2, n).astype(np.int64))

    return Dataset("tiny", split(IMAGES), split(0), split(16), ("a", "b"), "generated", mean=(127.5,), std=(73.9,))


def cnnrun_step_fn(dataset, held: bool):
    """µs per step of one epoch through cnnrun's runner and Trainer (benchmarks.common's real training path)."""
    from cnnrun.backends import TorchOptions

    spec = {"name": "tiny", "layers": [{"type": "flatten"}, {"type": "dense", "units": 2}]}
    epochs = cnnrun_epoch_fn("torch", TorchOptions(), dataset, batch_size=BATCH, on_device=held, model=spec)
    return lambda: BATCH / epochs() * 1e6


def reference_epoch_fn(dataset):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3, eps=1e-7, fused=True)
    x_all = (torch.from_numpy(dataset.train.images).float().reshape(IMAGES, 16) - 127.5) / 73.9
    y_all = torch.from_numpy(dataset.train.labels)

    def epoch() -> float:
        started = time.perf_counter()
        for index in torch.randperm(IMAGES).split(BATCH):
            loss = F.cross_entropy(layer(x_all[index]), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / (IMAGES // BATCH) * 1e6

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = tiny_dataset()
    variants = {
        "hand-written loop": reference_epoch_fn(dataset),
        "cnnrun, held (dataset.on_device=true)": cnnrun_step_fn(dataset, held=True),
        "cnnrun, host batches (prefetch thread)": cnnrun_step_fn(dataset, held=False),
    }
    results = alternate(variants, args.rounds)
    print(f"\nper-step time, 16->2 dense layer, batch {BATCH}, 1 thread, torch {torch.__version__} "
          f"({time.strftime('%Y-%m-%d')})")
    reference = statistics.median(results["hand-written loop"])
    for name, values in results.items():
        median = statistics.median(values)
        ratio = paired_ratio(results, name, "hand-written loop")
        print(f"{name:40s} {median:7.1f} µs/step  (+{median - reference:5.1f}; {ratio:.2f}x the loop's time, "
              f"median of per-round ratios)  runs: {' '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
