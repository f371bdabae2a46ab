"""CPU data parallelism, measured: 2 ranks × 1 thread (gloo, DDP) against 1 process × 2 threads, same global batch
(and 1 process × 1 thread, the unit both scale from).

Run: .venv/bin/python -m benchmarks.bench_distributed [--rounds 3] [--epochs 2] [--batch-size 128]
Each round runs both variants once, in turn (so load on the machine hits them alike), each in fresh processes: the
single process directly, the two ranks under torch's launcher (``torch.distributed.run --standalone``). A variant
trains classic_cnn on the bundled digits (3,500 training images, Adam) with cnnrun's trainer, one warm-up epoch then
``--epochs`` timed ones; its figure is the median images/s of its timed epochs (rank 0's epoch time, which includes
the all-reduces). The machine's load average is printed with the table: on a shared box it decides the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(epochs: int, batch_size: int, threads: int) -> None:
    """Train and print the timed epochs' images/s as JSON (rank 0 only, when several ranks run)."""
    from benchmarks.common import mnist_5k
    from cnnrun.backends import create_runner, validate_options
    from cnnrun.config import DeviceConfig, OptimizerConfig, TrainerConfig
    from cnnrun.distributed import load_engine
    from cnnrun.distributed.collective import LOCAL
    from cnnrun.distributed.runner import ShardedRunner
    from cnnrun.distributed.world import detect_world
    from cnnrun.progress import SilentView
    from cnnrun.spec import compile_model
    from cnnrun.tracking import NullLogger
    from cnnrun.trainer import Trainer
    from tests.helpers import shipped_model

    world = detect_world()
    dataset = mnist_5k()
    device = DeviceConfig(name="cpu", threads=threads)
    engine = load_engine("torch")
    collective = engine.join(world, device) if world.started else LOCAL
    model = compile_model(shipped_model("classic_cnn"), dataset.input_shape, 10)
    runner = create_runner("torch", model, OptimizerConfig(name="adam", lr=1e-3), validate_options("torch", {}),
                           device, 0, dataset.mean, dataset.std)
    if world.started:
        runner = ShardedRunner(runner, collective, engine.wrap(runner, collective, False), 10)
    cfg = TrainerConfig(epochs=1 + epochs, batch_size=batch_size, patience=None, progress=False)
    state = Trainer(runner, dataset, cfg, NullLogger(), SilentView(), lambda kind, s: None,
                    collective=collective).fit()
    if world.is_main:
        print(json.dumps([row["images_per_s"] for row in state.history[1:]]))
    collective.close()


def _run(command) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return statistics.median(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_threads:
        worker(args.epochs, args.batch_size, args.worker_threads)
        return
    me = [__file__, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    variants = {
        "1 process x 1 thread": [sys.executable, *me, "--worker-threads", "1"],
        "1 process x 2 threads": [sys.executable, *me, "--worker-threads", "2"],
        "2 ranks x 1 thread (gloo, DDP)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc-per-node=2", *me, "--worker-threads", "1"],
    }
    results = {name: [] for name in variants}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, command in variants.items():
            results[name].append(_run(command))
            loads.append(os.getloadavg()[0])
    from benchmarks.common import report

    report(f"classic_cnn, mnist_5k, global batch {args.batch_size}, load average {min(loads):.1f}-{max(loads):.1f}",
           results, baseline="1 process x 2 threads", subject="2 ranks x 1 thread (gloo, DDP)")


if __name__ == "__main__":
    main()
