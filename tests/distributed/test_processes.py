"""The multi-process command end to end, through the CLI: a Ctrl-C'd ``trainer.devices=2`` run ends KILLED with its
state saved once and resumes on one process; two torchrun "nodes" train what one process trains; a rank that
crashes stops the other and the run ends FAILED. Every case checks that no worker outlives its launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from cnnrun.distributed.world import detect_world
from tests.helpers import CNNRUN, ROOT, mlflow_runs
from tests.tiny import TINY, free_port

pytestmark = pytest.mark.slow

# 500 training images in global batches of 48 (ten of 48, the last of 20) over 2 ranks; 4 epochs unless stopped.
RUN = [*TINY, "trainer.batch_size=48", "trainer.log_every=2", "trainer.patience=null", "device.threads=1"]
TOLERANCE = 1e-5
STOP_WITHIN_S = 90  # the launcher, its ranks and their MLflow run are all done this long after the signal


def _env() -> Dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CNNRUN_DEBUG", None)
    return env


def _start(args: List[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _children() -> Dict[int, int]:
    """pid → parent pid of every process."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _descendants(pid: int) -> Set[int]:
    parents, found, frontier = _children(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: Set[int]) -> Set[int]:
    """The pids still running (a zombie waiting for its parent counts as gone)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _rank_of(pid: int) -> Optional[int]:
    """The rank a process was started as, read from its environment as cnnrun reads its own (torchrun, TF_CONFIG,
    MPI); None for a process that is no rank (a launcher, mpiexec)."""
    try:
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    world = detect_world(dict(v.decode(errors="replace").split("=", 1) for v in variables if b"=" in v))
    return world.rank if world.started else None


def _wait_for(process: subprocess.Popen, text: str, log: List[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        log.append(line)
        if text in line:
            return
    raise AssertionError(f"never printed {text!r}:\n{''.join(log)[-4000:]}")


def _finish(process: subprocess.Popen, log: List[str], timeout: float) -> int:
    try:
        rest, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    log.append(rest)
    return process.returncode


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _model(folder: Path):
    """The final checkpoint one run wrote under ``folder``/outputs (exactly one)."""
    found = sorted(folder.glob("outputs/*/*/model.safetensors"))
    assert len(found) == 1, found
    return ckpt_io.load(found[0])


def _assert_same_training(got, expected) -> None:
    """Per-epoch training and validation losses and the final weights, within TOLERANCE."""
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([row[key] for row in got.progress["history"]],
                                   [row[key] for row in expected.progress["history"]], rtol=0, atol=TOLERANCE,
                                   err_msg=key)
    assert got.weights.keys() == expected.weights.keys()
    for name in expected.weights:
        np.testing.assert_allclose(got.weights[name], expected.weights[name], rtol=0, atol=TOLERANCE, err_msg=name)


def _train(args: List[str], cwd: Path) -> None:
    cwd.mkdir(exist_ok=True)
    done = subprocess.run(CNNRUN + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_ctrl_c_stops_every_rank_the_run_resumes_on_one_process_and_two_nodes_train_the_same(tmp_path):
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    launcher = _start(CNNRUN + RUN + ["trainer.devices=2", "trainer.epochs=100"], interrupted)
    log: List[str] = []
    try:
        _wait_for(launcher, "epoch 1/100", log)
        workers = _descendants(launcher.pid)
        assert sorted(_rank_of(pid) for pid in workers if _rank_of(pid) is not None) == [0, 1]
        launcher.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal does (the workers run in sessions of their own)
        code = _finish(launcher, log, STOP_WITHIN_S)
    finally:
        _kill_group(launcher)
    output = "".join(log)
    assert code == 130, output[-4000:]
    assert output.count("state saved") == 1, output[-4000:]  # rank 0 saved, and said so; rank 1 wrote nothing
    assert not _alive(workers)
    _, runs = mlflow_runs(f"sqlite:///{interrupted / 'mlflow.db'}")
    assert [run.info.status for run in runs] == ["KILLED"]
    assert runs[0].data.params["world_size"] == "2" and runs[0].data.tags["cnnrun.world_size"] == "2"
    last = sorted(interrupted.glob("outputs/*/*/checkpoints/last.safetensors"))
    assert len(last) == 1
    epochs = ckpt_io.load(last[0]).progress["epoch"] + 2  # resume into at least one more whole epoch

    # N → M: the checkpoint two ranks wrote finishes on one process
    _train(RUN + [f"trainer.epochs={epochs}", f"trainer.resume={last[0]}"], interrupted)
    resumed = [ckpt_io.load(p) for p in interrupted.glob("outputs/*/*/model.safetensors")]
    assert len(resumed) == 1

    # Two "nodes" on this machine: two torchrun launches meeting at a c10d rendezvous on 127.0.0.1, trained without
    # interruption, give what the run stopped on two ranks and finished on one gives: neither the stop, nor the
    # change of world size, nor the machines' split changes the result. (That two ranks train what one process
    # trains, step by step, is tests/distributed/test_parallel_equivalence.py's, below the CLI.)
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1",
                "-m", "cnnrun", *RUN, f"trainer.epochs={epochs}"]
    launches = [_start(torchrun, nodes) for _ in range(2)]
    logs: List[List[str]] = [[], []]
    try:
        codes = [_finish(p, log, 300) for p, log in zip(launches, logs)]
    finally:
        for process in launches:
            _kill_group(process)
    assert codes == [0, 0], "\n".join(f"--- node {i}:\n" + "".join(log)[-3000:] for i, log in enumerate(logs))
    _assert_same_training(_model(nodes), resumed[0])  # and only rank 0 wrote outputs: one folder, one model
    assert len(list(nodes.glob("outputs/*/*"))) == 1
    _, runs = mlflow_runs(f"sqlite:///{nodes / 'mlflow.db'}")
    assert [(run.info.status, run.data.params["world_size"]) for run in runs] == [("FINISHED", "2")]


def stopped_run(args: List[str], cwd: Path, stop: Callable[[subprocess.Popen, Dict[int, int]], None]):
    """Start ``cnnrun ARGS`` on 2 processes for 100 epochs, call ``stop(launcher, {rank: pid})`` once epoch 1 is
    done, and wait for every process to end: (exit code, output, the workers' pids, seconds the stop took)."""
    launcher = _start(CNNRUN + args + ["trainer.devices=2", "trainer.epochs=100"], cwd)
    log: List[str] = []
    try:
        _wait_for(launcher, "epoch 1/100", log)
        workers = _descendants(launcher.pid)
        ranks = {_rank_of(pid): pid for pid in workers if _rank_of(pid) is not None}
        assert sorted(ranks) == [0, 1], "".join(log)[-4000:]
        stop(launcher, ranks)
        started = time.monotonic()
        code = _finish(launcher, log, STOP_WITHIN_S)
        stopped_after = time.monotonic() - started
    finally:
        _kill_group(launcher)
    assert stopped_after < STOP_WITHIN_S
    assert not _alive(workers), "a worker outlived its launcher"
    return code, "".join(log), workers, stopped_after


def kill_rank_1(launcher: subprocess.Popen, ranks: Dict[int, int]) -> None:
    os.kill(ranks[1], signal.SIGKILL)  # a rank that dies without a word (out of memory, a segfault)


def terminate_rank_1(launcher: subprocess.Popen, ranks: Dict[int, int]) -> None:
    os.kill(ranks[1], signal.SIGTERM)  # a scheduler preempting one process


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree at the next sync, so both stop after the same step; had rank 1
    stopped alone, rank 0 would fail waiting for it and the run would end FAILED."""
    code, output, _, _ = stopped_run(RUN, tmp_path, terminate_rank_1)
    assert code == 130, output[-4000:]
    assert output.count("state saved") == 1 and "stopped by another rank's stop request" in output, output[-4000:]
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [run.info.status for run in runs] == ["KILLED"]


def test_a_crashed_rank_stops_the_others_and_the_run_ends_failed(tmp_path):
    code, output, _, _ = stopped_run(RUN, tmp_path, kill_rank_1)
    assert code == 1, output[-4000:]
    assert "rank 1 was killed by SIGKILL" in output, output[-4000:]
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [run.info.status for run in runs] == ["FAILED"]
