"""cnnrun's PyTorch training path against hand-written PyTorch loops for classic_cnn (batch 128, Adam).

Run: .venv/bin/python -m benchmarks.bench_torch [--rounds 5]
The references are written without cnnrun's compiler, the way an expert would: data preloaded as normalised
float tensors, each memory-format/optimizer/thread variant tried; torch.compile is checked for correct gradients
before it is timed. Variants alternate round by round; medians and the ratio are printed.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import alternate, cnnrun_epoch_fn, images_per_second, mnist_5k, paired_ratio, report


def classic_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )


def reference_epoch_fn(dataset, channels_last: bool, fused: bool, threads: int, compiled: bool = False):
    torch.manual_seed(0)
    model = classic_cnn()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x_all = torch.from_numpy(dataset.train.images).permute(0, 3, 1, 2).float()
    x_all = ((x_all - dataset.mean[0]) / dataset.std[0]).contiguous(memory_format=fmt)
    y_all = torch.from_numpy(dataset.train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=fused, foreach=None if fused else True)
    forward = torch.compile(model) if compiled else model
    rng = np.random.default_rng(0)

    def step(batch):
        x, y = batch
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch() -> float:
        torch.set_num_threads(threads)
        order = torch.from_numpy(rng.permutation(len(y_all)))
        batches = ((x_all[idx], y_all[idx]) for idx in order.split(128))
        return images_per_second(step, batches, lambda: None)

    return epoch


def compiled_gradients_match(batch_size: int = 128) -> bool:
    """torch.compile on CPU has returned all-zero conv gradients at batch 128 (torch 2.13): check before timing."""
    torch.manual_seed(0)
    eager = classic_cnn()
    twin = classic_cnn()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin)
    x = torch.randn(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    for net in (eager, compiled):
        F.cross_entropy(net(x), y).backward()
    pairs = zip(eager.parameters(), compiled.parameters())
    return all(torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5) for a, b in pairs)


ONE_THREAD = "cnnrun framework=torch device.threads=1"


def one_thread(epoch_fn):
    def run() -> float:
        torch.set_num_threads(1)  # process-wide: the other variants set their own count per epoch
        return epoch_fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to warm up)")
    parser.add_argument("--bf16", action="store_true", help="also time cnnrun with trainer.precision=bf16")
    args = parser.parse_args()
    from cnnrun.backends import TorchOptions

    dataset = mnist_5k()
    cores = len(os.sched_getaffinity(0))
    # torch's thread count is process-wide and the references set theirs per epoch (one of them to 1): give cnnrun
    # the count a fresh `cnnrun` process starts with, read before any variant ran.
    fresh_threads = torch.get_num_threads()
    cnnrun_epoch = cnnrun_epoch_fn("torch", TorchOptions(), dataset)

    def fresh_threads_for(epoch_fn):
        def run() -> float:
            torch.set_num_threads(fresh_threads)
            return epoch_fn()
        return run

    cnnrun_fresh_threads = fresh_threads_for(cnnrun_epoch)

    variants = {
        "reference eager NCHW (foreach Adam)": reference_epoch_fn(dataset, False, False, cores),
        "reference channels_last": reference_epoch_fn(dataset, True, False, cores),
        "reference channels_last + fused Adam": reference_epoch_fn(dataset, True, True, cores),
        "reference eager NCHW, 1 thread": reference_epoch_fn(dataset, False, False, 1),
        "reference channels_last + fused Adam, 1 thread": reference_epoch_fn(dataset, True, True, 1),
        "cnnrun framework=torch (defaults)": cnnrun_fresh_threads,
        # On a machine loaded beyond its cores, torch's threads wait on each other at every parallel region and
        # one thread can outrun two: compare one thread with one thread too.
        ONE_THREAD: one_thread(cnnrun_epoch_fn("torch", TorchOptions(), dataset, threads=1)),
    }
    if args.bf16:
        variants["cnnrun framework=torch trainer.precision=bf16"] = fresh_threads_for(
            cnnrun_epoch_fn("torch", TorchOptions(), dataset, precision="bf16"))
    if args.compile:
        ok = compiled_gradients_match()
        print(f"torch.compile gradients match eager at batch 128: {ok}")
        if ok:
            variants["reference torch.compile channels_last"] = reference_epoch_fn(dataset, True, True, cores, True)
    results = alternate(variants, args.rounds)
    references = [k for k in results if k.startswith("reference")]
    fastest = max((k for k in references if "1 thread" not in k), key=lambda k: np.median(results[k]))
    fastest_one = max((k for k in references if "1 thread" in k), key=lambda k: np.median(results[k]))
    report("classic_cnn training on mnist_5k, PyTorch " + torch.__version__, results, fastest,
           "cnnrun framework=torch (defaults)")
    print(f"median of per-round ratios, cnnrun / {fastest}: "
          f"{paired_ratio(results, 'cnnrun framework=torch (defaults)', fastest):.3f}")
    one = np.median(results[ONE_THREAD]) / np.median(results[fastest_one])
    print(f"one thread: cnnrun / {fastest_one}: {one:.3f} (medians), "
          f"{paired_ratio(results, ONE_THREAD, fastest_one):.3f} (median of per-round ratios)")
    if args.bf16:
        bf16 = paired_ratio(results, "cnnrun framework=torch trainer.precision=bf16",
                            "cnnrun framework=torch (defaults)")
        print(f"cnnrun bf16 / fp32, median of per-round ratios: {bf16:.3f}")


if __name__ == "__main__":
    main()
