"""Peak memory of a training run on 2,000 vs 20,000 RGB 128×128 images (≈ 0.1 vs 1 GB decoded), per framework.

Generates class folders of PNGs under /tmp (removed afterwards), decodes each folder once into cnnrun's cache
(a first run, reported too), then runs ``cnnrun dataset=folder`` for one epoch per framework on each folder; every
such run reuses the cache without decoding. The model is deliberately tiny (an 8×8 average pool and one dense
layer) so that the epoch over all the images takes seconds: what is measured is the data path, not the network.
Train and evaluation batches are 128 images, so that the 2,000-image run's splits (1,400 / 200 / 400) fill whole
batches as the large run's do: the buffers of a few prepared batches are a fixed cost, what must not grow is the
rest.
Peak RSS is the child's ``ru_maxrss`` (which counts mapped file pages too). Target: the 20k run's peak exceeds
the 2k run's by less than 250 MB.

    python benchmarks/bench_memory.py [--frameworks torch,tensorflow,keras,chainer] [--images 2000,20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CLASSES = 10
SIZE = 128
TARGET_MB = 250
MODEL = """\
name: poolnet
layers:
  - {type: avgpool, size: 8}
  - {type: flatten}
  - {type: dense, units: "${dataset.num_classes}"}
  - {type: softmax}
"""


def _write_pngs(job) -> None:
    from PIL import Image

    folder, start, stop = job
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        # a coarse random pattern, upscaled: compresses like a photo rather than like noise (small, fast)
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        image.save(Path(folder) / f"c{i % CLASSES}" / f"{i:06d}.png", compress_level=1)


def generate(root: Path, count: int) -> None:
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(root), s, min(s + step, count)) for s in range(0, count, step)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_write_pngs, jobs))


def run(framework: str, root: Path, workdir: Path, env) -> tuple:
    """(peak RSS in MB, seconds) of one training run, which must succeed."""
    # under timeout(1): its rusage on exit includes the peak of the run it waited for
    args = ["timeout", "900", sys.executable, "-m", "cnnrun", "--config-dir", str(workdir / "conf"), "model=poolnet",
            f"framework={framework}", "device=cpu", "dataset=folder", f"dataset.root={root}",
            f"dataset.num_classes={CLASSES}", f"dataset.image_size=[{SIZE},{SIZE}]", "trainer.epochs=1",
            "trainer.batch_size=128", "trainer.eval_batch_size=128", "trainer.progress=false",
            "tracking.enabled=false"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen, to get this child's own peak
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} on {root} failed:\n{out[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frameworks", default="torch,tensorflow,keras,chainer")
    parser.add_argument("--images", default="2000,20000")
    args = parser.parse_args()
    frameworks = args.frameworks.split(",")
    sizes = [int(n) for n in args.images.split(",")]
    base = Path(tempfile.mkdtemp(prefix="cnnrun-memory-", dir="/tmp"))
    env = {**os.environ, "CNNRUN_DATA_DIR": str(base / "data-home")}
    try:
        (base / "conf" / "model").mkdir(parents=True)
        (base / "conf" / "model" / "poolnet.yaml").write_text(MODEL)
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
        peaks = {}
        for count in sizes:
            root = base / f"images-{count}"
            started = time.perf_counter()
            generate(root, count)
            print(f"generated {count} PNGs in {time.perf_counter() - started:.0f} s")
            rss, seconds, _ = run(frameworks[0], root, base, env)  # decodes into the cache
            print(f"  {count:6d} images  first run ({frameworks[0]}, decodes and caches): peak {rss:7.0f} MB, "
                  f"{seconds:5.1f} s")
            for framework in frameworks:
                rss, seconds, out = run(framework, root, base, env)
                assert "decoding images" not in out, "the cache was not reused"
                peaks[framework, count] = rss
                print(f"  {count:6d} images  {framework:10s} peak {rss:7.0f} MB  {seconds:5.1f} s", flush=True)
            shutil.rmtree(root)
        if len(sizes) == 2:
            small, large = sizes
            print(f"\npeak RSS, {small} vs {large} images (target: difference < {TARGET_MB} MB)")
            for framework in frameworks:
                a, b = peaks[framework, small], peaks[framework, large]
                verdict = "ok" if b - a < TARGET_MB else "MISSED"
                print(f"  {framework:10s} {a:7.0f} MB  {b:7.0f} MB  +{b - a:5.0f} MB  {verdict}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
