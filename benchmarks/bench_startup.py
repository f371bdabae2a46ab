"""How long `cnnrun` takes to start: whole-process wall time of the commands a user types most.

Run: .venv/bin/python -m benchmarks.bench_startup [--runs 5] [--root OTHER_CHECKOUT ...]
Each command runs in a fresh process (``python -m cnnrun ...``) from a scratch directory, so the time includes
the interpreter, every import, Hydra's config composition and the task itself; the median of ``--runs`` is
reported. Commands (and checkouts, with ``--root``: e.g. an older commit unpacked with ``git archive``, to
compare before and after) take turns run by run, so load from anything else on the machine falls on all alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]

COMMANDS: Dict[str, List[str]] = {
    "--help": ["--help"],
    "--version": ["--version"],
    "task=summary": ["task=summary"],
    "task=validate": ["task=validate"],
}


def time_once(args: List[str], cwd: Path, root: Path = ROOT) -> Tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh ``cnnrun ARGS`` process. CPU time (user + system) hardly moves
    with other load on the machine, so it backs up the wall time on a shared box."""
    env = dict(os.environ, PYTHONPATH=str(root))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cnnrun", *args], cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"cnnrun {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command (median reported)")
    parser.add_argument("--root", type=Path, action="append", default=[],
                        help="time this checkout too (its cnnrun on PYTHONPATH); repeatable")
    args = parser.parse_args()
    roots = [ROOT, *(r.resolve() for r in args.root)]
    times: Dict[Tuple[Path, str], List[Tuple[float, float]]] = {(r, name): [] for r in roots for name in COMMANDS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        for root, name in times:  # one untimed run each: warm the OS file cache and __pycache__
            time_once(COMMANDS[name], Path(scratch), root)
        for _ in range(args.runs):
            for root, name in times:
                times[root, name].append(time_once(COMMANDS[name], Path(scratch), root))
    print(f"cnnrun start-up, whole process, median of {args.runs} ({time.strftime('%Y-%m-%d %H:%M')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after)")
    for root in roots:
        print(f"\n{root}")
        print(f"{'command':<22}{'wall s':>8}{'min':>7}{'max':>7}{'CPU s':>8}")
        for name in COMMANDS:
            wall = [w for w, _ in times[root, name]]
            cpu = [c for _, c in times[root, name]]
            print(f"{'cnnrun ' + name:<22}{statistics.median(wall):>8.2f}{min(wall):>7.2f}{max(wall):>7.2f}"
                  f"{statistics.median(cpu):>8.2f}")


if __name__ == "__main__":
    main()
