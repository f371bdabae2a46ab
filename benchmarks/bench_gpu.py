"""cnnrun on a GPU against hand-written loops, side by side: the GPU targets of the input-pipeline work.

Run from the repository root: ``python -m benchmarks.bench_gpu --device cuda`` (about 4 minutes on an H200);
``--device cpu --images 2000 --rounds 1`` is a smoke run of every code path on a machine without a GPU.

Four parts, each in a process of its own (a crash or a missing framework in one leaves the others' figures; Keras
fixes its backend at its first import), each timing whole epochs of classic_cnn on Fashion-MNIST's 54,000 training
images (mnist_5k, with a note, where Fashion-MNIST's files are not found), the variants taking turns epoch by epoch
after one warm-up epoch each (kernel selection, allocations), median of the measured epochs:

- ``torch``: a hand-written PyTorch loop written for speed (channels_last model and inputs, the normalised data
  held on the device, each batch an ``index_select`` of an on-device permutation, fused Adam, no sync until the
  epoch ends, cuDNN autotuning) against cnnrun's real path (``create_runner`` + ``Trainer``) with the device feed
  (what ``dataset.on_device=auto`` gives on a GPU) and with host batches; then both with TensorFloat-32, torch's
  own default for convolutions, which cnnrun switches off unless ``framework.tf32=true``;
- ``chainer``: a hand-written Chainer loop (CuPy arrays held on the device, ``chainer.optimizers.Adam``, type
  checks off) against cnnrun's Chainer runner with the device feed;
- ``keras``: ``keras.Model.fit`` on the torch backend (the same network as a Keras Sequential model, NumPy arrays,
  Keras's Adam) against cnnrun ``framework=keras framework.backend=torch``, device feed and host batches;
- ``precision``: cnnrun torch, ``trainer.precision`` bf16 against fp32 at batch 256 with the device feed, for
  resnet_lite and for a wide classic_cnn (4x the filters and units, as in gpu_check.sh).

Every pairing checks that both sides train the same number of parameters on the same number of images per epoch.
Batch 128, Adam (lr 1e-3, eps 1e-7), float32 unless stated. ``--out DIR`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from benchmarks.common import alternate, cnnrun_epoch_fn, keras_classic_cnn, paired_ratio, report

PARTS = ("torch", "chainer", "keras", "precision")
ROUNDS = {"torch": 4, "chainer": 3, "keras": 3, "precision": 3}  # measured epochs per variant (~4 min on an H200)
BATCH, LR, EPS, SEED = 128, 1e-3, 1e-7, 0
# classic_cnn with 4x the filters and units (the WIDE network of gpu_check.sh)
WIDE = {0: {"filters": 128}, 2: {"filters": 256}, 5: {"units": 4096}}


class Skipped(Exception):
    """A part that cannot run here (its framework is missing or sees no GPU): reported, never counted."""


# ------------------------------------------------------------------------------------------------------ data


def training_data(images: Optional[int]):
    """Fashion-MNIST as cnnrun splits it (54,000 training images), the first ``images`` of each split when given
    (a tenth as many for validation and test); mnist_5k, said so, where Fashion-MNIST's files are not found."""
    from cnnrun.config import DatasetConfig
    from cnnrun.data import Split, load_dataset
    from cnnrun.errors import UserError

    try:
        dataset = load_dataset(DatasetConfig(name="fashion_mnist", num_classes=10, channels=1, image_size=(28, 28),
                                             download=False))
    except UserError as err:
        print(f"note: Fashion-MNIST not found ({str(err).splitlines()[0]}); using mnist_5k instead", flush=True)
        dataset = load_dataset(DatasetConfig(name="mnist_5k", num_classes=10, channels=1, image_size=(28, 28)))
    if images is None:
        return dataset

    def first(split, n):
        return Split(np.ascontiguousarray(split.images[:n]), np.ascontiguousarray(split.labels[:n]))

    held_out = max(1, images // 10)
    return dataclasses.replace(dataset, train=first(dataset.train, images), val=first(dataset.val, held_out),
                               test=first(dataset.test, held_out))


def normalised_nchw(dataset) -> np.ndarray:
    """The training images as the references take them: float32 NCHW, (x - mean) / std."""
    images = dataset.train.images.transpose(0, 3, 1, 2).astype(np.float32)
    return (images - np.float32(dataset.mean[0])) / np.float32(dataset.std[0])


# ------------------------------------------------------------------------------------------------------ checks


def check_same_work(name: str, reference_params: int, reference_images: int, cnnrun_epochs) -> None:
    """Both sides trained a network of the same size on the same images (after the warm-up epoch)."""
    ours_params, ours_images = cnnrun_epochs.parameter_count(), cnnrun_epochs.last_epoch_images
    print(f"{name}: parameters {reference_params:,} (reference) / {ours_params:,} (cnnrun); images per epoch "
          f"{reference_images:,} / {ours_images:,}", flush=True)
    assert ours_params == reference_params, f"{name}: the networks differ in size"
    assert ours_images == reference_images, f"{name}: the epochs differ in images"


def timed(epoch_fn: Callable[[], int], sync: Callable[[], None]) -> Callable[[], float]:
    """An epoch function returning images/s from one returning the images it trained (synced before and after)."""
    def run() -> float:
        sync()
        start = time.perf_counter()
        n = epoch_fn()
        sync()
        run.images = n
        return n / (time.perf_counter() - start)

    run.images = 0
    return run


# ------------------------------------------------------------------------------------------------------ torch


def torch_reference(dataset, device: str, batch_size: int = BATCH):
    """classic_cnn by hand, written for speed; returns (epoch function, parameter count)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.bench_torch import classic_cnn

    dev = torch.device(device)
    torch.manual_seed(SEED)
    model = classic_cnn().to(dev, memory_format=torch.channels_last)
    x_all = torch.from_numpy(normalised_nchw(dataset)).to(dev).contiguous(memory_format=torch.channels_last)
    y_all = torch.from_numpy(dataset.train.labels).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, eps=EPS, fused=True)
    rng = np.random.default_rng(SEED)

    def epoch() -> int:
        order = torch.from_numpy(rng.permutation(len(y_all))).to(dev)  # one small copy per epoch
        loss_sum = torch.zeros((), device=dev)
        for index in order.split(batch_size):
            x, y = x_all.index_select(0, index), y_all.index_select(0, index)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
        float(loss_sum)  # the epoch's only sync
        return len(order)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    return timed(epoch, sync), sum(p.numel() for p in model.parameters())


def torch_settings(tf32: bool, autotune: bool, fn: Callable[[], float]) -> Callable[[], float]:
    """``fn`` run under torch's process-wide TF32 and cuDNN-autotuning switches: each variant gets its own."""
    import torch

    from cnnrun.backends.torch import set_tf32

    def run() -> float:
        set_tf32(tf32)
        torch.backends.cudnn.benchmark = autotune
        return fn()

    run.__dict__.update(getattr(fn, "__dict__", {}))
    return run


def part_torch(dataset, device: str, rounds: int) -> Dict:
    import torch

    from cnnrun.backends import TorchOptions

    # cuDNN autotuning is on in the hand-written loop and in cnnrun by default (framework.cudnn_benchmark); one
    # more cnnrun variant runs with it off, to show what it is worth.
    autotune = TorchOptions().cudnn_benchmark
    reference, reference_params = torch_reference(dataset, device)
    reference_tf32, _ = torch_reference(dataset, device)

    def cnnrun_torch(on_device: bool = True, tf32: bool = False, cudnn_benchmark: bool = autotune):
        options = TorchOptions(tf32=tf32, cudnn_benchmark=cudnn_benchmark)
        return cnnrun_epoch_fn("torch", options, dataset, device=device, on_device=on_device)

    epochs = {"device": cnnrun_torch(), "host": cnnrun_torch(on_device=False),
              "no_autotune": cnnrun_torch(cudnn_benchmark=False), "device_tf32": cnnrun_torch(tf32=True)}
    names = {
        "reference": "hand-written torch loop (data on device)",
        "device": "cnnrun torch, device feed",
        "host": "cnnrun torch, host feed",
        "no_autotune": "cnnrun torch, device feed, cudnn_benchmark=false",
        "reference_tf32": "hand-written torch loop, TF32",
        "device_tf32": "cnnrun torch framework.tf32=true, device feed",
    }
    variants = {
        names["reference"]: torch_settings(False, True, reference),
        names["device"]: torch_settings(False, autotune, epochs["device"]),
        names["host"]: torch_settings(False, autotune, epochs["host"]),
        names["no_autotune"]: torch_settings(False, False, epochs["no_autotune"]),
        names["reference_tf32"]: torch_settings(True, True, reference_tf32),
        names["device_tf32"]: torch_settings(True, autotune, epochs["device_tf32"]),
    }
    results = alternate(variants, rounds)
    for key, cnnrun_epochs in epochs.items():
        check_same_work(names[key], reference_params, reference.images, cnnrun_epochs)
    title = f"torch {torch.__version__}: classic_cnn, batch {BATCH}, float32 (IEEE unless TF32)"
    return finish(title, device, results, [
        (names["device"], names["reference"], 1.0),
        (names["host"], names["reference"], None),
        (names["no_autotune"], names["reference"], None),
        (names["device_tf32"], names["reference_tf32"], 1.0),
    ])


# ------------------------------------------------------------------------------------------------------ chainer


def chainer_device(device: str):
    from cnnrun.backends.chainer_env import cupy_status, import_chainer

    chainer = import_chainer()
    if device == "cpu":
        return chainer.get_device("@numpy")
    cupy, why = cupy_status()
    if cupy is None:
        raise Skipped(why)
    return chainer.get_device("@cupy:0")


def chainer_reference(dataset, device: str, batch_size: int = BATCH):
    """classic_cnn by hand in Chainer (the model of bench_chainer), data held on the device; returns (epoch
    function, parameter count)."""
    from cnnrun.backends.chainer_env import import_chainer

    chainer = import_chainer()
    import chainer.functions as F

    from benchmarks.bench_chainer import ClassicCNN

    target = chainer_device(device)
    target.use()
    xp = target.xp
    np.random.seed(SEED)  # Chainer's default initializers draw from NumPy's global generator
    model = ClassicCNN()
    model.to_device(target)
    optimizer = chainer.optimizers.Adam(alpha=LR, beta1=0.9, beta2=0.999, eps=EPS)
    optimizer.setup(model)
    x_all = xp.asarray(normalised_nchw(dataset))
    y_all = xp.asarray(dataset.train.labels.astype(np.int32))
    rng = np.random.default_rng(SEED)
    use_cudnn = "auto" if device != "cpu" else "never"

    def epoch() -> int:
        order = xp.asarray(rng.permutation(len(y_all)))
        loss_sum = xp.zeros((), np.float32)
        with chainer.using_config("use_cudnn", use_cudnn), chainer.using_config("type_check", False):
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                loss = F.softmax_cross_entropy(model(x_all.take(index, axis=0)), y_all.take(index))
                model.cleargrads()
                loss.backward()
                optimizer.update()
                loss_sum += loss.array * len(index)
        float(loss_sum)  # the epoch's only sync
        return len(order)

    parameters = sum(p.size for p in model.params())
    sync = xp.cuda.Stream.null.synchronize if xp is not np else (lambda: None)
    return timed(epoch, sync), parameters


def part_chainer(dataset, device: str, rounds: int) -> Dict:
    try:
        from cnnrun.backends.chainer_env import import_chainer

        chainer = import_chainer()
    except ImportError as err:
        raise Skipped(f"Chainer cannot be imported: {err}") from None
    from cnnrun.backends import ChainerOptions

    reference, reference_params = chainer_reference(dataset, device)
    device_feed = cnnrun_epoch_fn("chainer", ChainerOptions(), dataset, device=device, on_device=True)
    names = {"reference": "hand-written Chainer loop (data on device)", "device": "cnnrun chainer, device feed"}
    results = alternate({names["reference"]: reference, names["device"]: device_feed}, rounds)
    check_same_work(names["device"], reference_params, reference.images, device_feed)
    return finish(f"chainer {chainer.__version__} ({device_feed.runner.device_name}): classic_cnn, batch {BATCH}",
                  device, results, [(names["device"], names["reference"], 1.0)])


# ------------------------------------------------------------------------------------------------------ keras


def keras_fit_reference(dataset, batch_size: int = BATCH):
    """classic_cnn as a Keras Sequential model trained by ``model.fit`` on NumPy arrays; returns (epoch function,
    parameter count). Timed from ``on_epoch_begin`` to ``on_epoch_end`` (the GPU synced at both), leaving out fit's
    per-call set-up as cnnrun's figure leaves out its validation."""
    import keras
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            sync()
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            sync()
            self.seconds = time.perf_counter() - self.started

    keras.utils.set_random_seed(SEED)
    model = keras_classic_cnn(keras, LR, EPS)
    x = normalised_nchw(dataset).transpose(0, 2, 3, 1).copy()  # NHWC: Keras is channels_last
    y = dataset.train.labels
    steps = -(-len(y) // batch_size)

    def epoch() -> float:
        timer = EpochTimer()
        before = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0, callbacks=[timer])
        done = int(keras.ops.convert_to_numpy(model.optimizer.iterations)) - before
        assert done == steps, f"keras fit ran {done} steps, not {steps}"
        epoch.images = len(y)  # every step of the epoch ran: all the images
        return len(y) / timer.seconds

    epoch.images = 0
    return epoch, model.count_params()


def part_keras(dataset, device: str, rounds: int) -> Dict:
    import torch  # noqa: F401  (first: Keras then finds its backend already imported)

    if os.environ.get("KERAS_BACKEND") != "torch":
        raise Skipped("the keras part runs with KERAS_BACKEND=torch (bench_gpu starts it so)")
    try:
        import keras
    except ImportError as err:
        raise Skipped(f"Keras cannot be imported: {err}") from None
    from cnnrun.backends import KerasOptions

    reference, reference_params = keras_fit_reference(dataset)
    options = KerasOptions(backend="torch")
    device_feed = cnnrun_epoch_fn("keras", options, dataset, device=device, on_device=True)
    host_feed = cnnrun_epoch_fn("keras", options, dataset, device=device)
    names = {"reference": "keras Model.fit (torch backend)", "device": "cnnrun keras-torch, device feed",
             "host": "cnnrun keras-torch, host feed"}
    results = alternate({names["reference"]: reference, names["device"]: device_feed, names["host"]: host_feed},
                        rounds)
    for key, epochs in (("device", device_feed), ("host", host_feed)):
        check_same_work(names[key], reference_params, reference.images, epochs)
    return finish(f"keras {keras.__version__} on torch {torch.__version__}: classic_cnn, batch {BATCH}", device,
                  results, [
        (names["device"], names["reference"], 1.0),
        (names["host"], names["reference"], None),
    ])


# ------------------------------------------------------------------------------------------------------ precision


def wide_classic_cnn() -> Dict:
    from tests.helpers import shipped_model

    spec = shipped_model("classic_cnn")
    for index, changes in WIDE.items():
        spec["layers"][index].update(changes)
    return spec


def part_precision(dataset, device: str, rounds: int) -> Dict:
    import torch

    from cnnrun.backends import TorchOptions

    nets = {"resnet_lite": "resnet_lite", "wide classic_cnn": wide_classic_cnn()}
    variants, pairs = {}, []
    for label, model in nets.items():
        for precision in ("fp32", "bf16"):
            epochs = cnnrun_epoch_fn("torch", TorchOptions(), dataset, batch_size=256, precision=precision,
                                     device=device, on_device=True, model=model)
            variants[f"cnnrun torch {label} {precision}"] = epochs
        print(f"{label}: {epochs.parameter_count():,} parameters", flush=True)
        pairs.append((f"cnnrun torch {label} bf16", f"cnnrun torch {label} fp32", None))
    results = alternate(variants, rounds)
    return finish(f"torch {torch.__version__}: trainer.precision bf16 vs fp32, batch 256, device feed", device,
                  results, pairs)


# ------------------------------------------------------------------------------------------------------ reporting


def finish(title: str, device: str, results: Dict[str, List[float]], pairs) -> Dict:
    """Prints the part's table and ratios; returns them for the summary."""
    report(f"{title}; {where(device)}", results, pairs[0][1], pairs[0][0])
    ratios = []
    for ours, theirs, target in pairs:
        medians = statistics.median(results[ours]) / statistics.median(results[theirs])
        paired = paired_ratio(results, ours, theirs)
        goal = f" (target >= {target:.2f})" if target else ""
        print(f"{ours} / {theirs}: {medians:.3f} of medians, {paired:.3f} median of per-round ratios{goal}")
        ratios.append({"ours": ours, "theirs": theirs, "of_medians": medians, "paired": paired, "target": target})
    return {"title": title, "where": where(device), "images_per_s": results, "ratios": ratios}


def where(device: str) -> str:
    """The device, for the tables: the GPU's name, or the CPU."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return f"CPU {platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for package in ("numpy", "torch", "cupy", "chainer", "keras"):
        try:
            from importlib.metadata import version

            found.append(f"{package} {version(package)}")
        except Exception:  # not installed (CuPy's distribution is named cupy-cudaNNx: look it up by module)
            found.append(f"{package} " + module_version(package))
    return ", ".join(found)


def module_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except Exception as err:  # a broken install says so instead of failing the summary
        return f"missing ({type(err).__name__})"


RUNNERS = {"torch": part_torch, "chainer": part_chainer, "keras": part_keras, "precision": part_precision}


def run_part(args) -> None:
    """One part in this process; its figures (or why it was skipped) go to ``args.json``."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Keras on torch would take a GPU it sees
    rounds = args.rounds or ROUNDS[args.part]
    try:
        dataset = training_data(args.images)
        print(f"\n=== {args.part}: {len(dataset.train):,} training images of {dataset.name}, {rounds} measured "
              f"epochs per variant after 1 warm-up", flush=True)
        outcome = RUNNERS[args.part](dataset, args.device, rounds)
        outcome.update(dataset=dataset.name, images=len(dataset.train), rounds=rounds)
    except Skipped as why:
        print(f"=== {args.part}: skipped: {why}", flush=True)
        outcome = {"skipped": str(why)}
    with open(args.json, "w") as out:
        json.dump(outcome, out)


def run_all(args) -> int:
    """Every part in its own process, then one summary of the ratios."""
    print(f"bench_gpu {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, --device {args.device}; {versions()}",
          flush=True)
    summary, failed = {}, False
    deadline = time.monotonic() + args.budget if args.budget else None
    with tempfile.TemporaryDirectory() as scratch:
        for part in args.parts.split(","):
            path = os.path.join(scratch, f"{part}.json")
            command = [sys.executable, "-m", "benchmarks.bench_gpu", "--part", part, "--device", args.device,
                       "--json", path]
            command += ["--images", str(args.images)] if args.images else []
            command += ["--rounds", str(args.rounds)] if args.rounds else []
            env = dict(os.environ, KERAS_BACKEND="torch") if part == "keras" else None
            started = time.perf_counter()
            limit = args.part_timeout if deadline is None else min(args.part_timeout, deadline - time.monotonic())
            try:
                code = subprocess.run(command, env=env, timeout=max(limit, 1)).returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {max(limit, 1):.0f} s"
            seconds = time.perf_counter() - started
            if code == 0 and os.path.exists(path):
                with open(path) as f:
                    summary[part] = dict(json.load(f), seconds=seconds)
            else:
                failed = True
                summary[part] = {"failed": code if isinstance(code, str) else f"exit {code}", "seconds": seconds}
    print(f"\n=== summary ({time.strftime('%Y-%m-%d', time.gmtime())}; {versions()})")
    for part, outcome in summary.items():
        if "ratios" not in outcome:
            print(f"{part}: " + (f"skipped: {outcome['skipped']}" if "skipped" in outcome else outcome["failed"]))
            continue
        print(f"{part} ({outcome['where']}; {outcome['images']:,} {outcome['dataset']} images, "
              f"{outcome['rounds']} rounds, {outcome['seconds']:.0f} s):")
        for r in outcome["ratios"]:
            verdict = "" if r["target"] is None else (" MET" if r["paired"] >= r["target"] else " MISSED") + \
                f" (target >= {r['target']:.2f})"
            print(f"  {r['ours']} / {r['theirs']}: {r['paired']:.3f}x{verdict}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
                       "device": args.device, "parts": summary}, f, indent=1)
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    parser.add_argument("--images", type=int, default=None, help="training images per epoch (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help=f"measured epochs per variant (default: {ROUNDS})")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts, comma-separated")
    parser.add_argument("--part-timeout", type=int, default=240, help="seconds each part may take")
    parser.add_argument("--budget", type=int, default=None,
                        help="seconds for the whole run: a part gets at most what is left, so the summary prints")
    parser.add_argument("--out", default=None, help="a folder for bench_gpu.json")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a process of its own
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_part(args)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
