"""Data-parallel training on TensorFlow (and Keras on it, tf.distribute) and on Chainer (ChainerMN), on the CPU.

Two ranks train what one process trains, with global batches that no number of ranks divides: the same per-epoch
training and validation losses and final weights (1e-5 without batchnorm; 1e-4 with batchnorm synchronised over
the ranks), through tests/distributed/trainer_worker.py started as the engines' launchers start cnnrun (TF_CONFIG
workers; mpiexec). TensorFlow starts slowly, so one launch serves every TensorFlow and Keras case. Through the CLI
with ``trainer.devices=2``: a killed rank and a Ctrl-C leave no RUNNING MLflow run and no process behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from tests.helpers import CNNRUN, ROOT, mlflow_runs, run_cli
from tests.tiny import TINY

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("trainer_worker.py")

FRAMEWORKS = {
    "tensorflow": ["framework=tensorflow"],
    "keras": ["framework=keras", "framework.backend=tensorflow"],
    "chainer": ["framework=chainer"],
}
MPI_MISSING = shutil.which("mpiexec") is None
TOLERANCE = {"tensorflow": 1e-5, "keras-tensorflow": 1e-5, "chainer": 1e-5,
             "tensorflow-syncbn": 1e-4, "keras-tensorflow-syncbn": 1e-4}


def _run(command: List[str], tmp_path: Path, env: Optional[Dict[str, str]] = None) -> None:
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _two_ranks(engine: str, out: Path, tmp_path: Path) -> None:
    """The worker on two ranks, started the way the engine's own launcher starts cnnrun."""
    worker = [sys.executable, str(WORKER), str(out), engine]
    if engine == "chainer":
        from cnnrun.distributed.chainer import mpiexec_command

        _run([*mpiexec_command(2), *worker], tmp_path)
        return
    from cnnrun.distributed.local_workers import run_workers
    from cnnrun.distributed.tensorflow import worker_environments

    environments = [{**env, "PYTHONPATH": str(ROOT)} for env in worker_environments(2)]
    outcome = run_workers(worker, environments)
    assert not outcome.failures and outcome.signal is None, outcome.describe()


@pytest.fixture(scope="module", params=["tensorflow", "chainer"])
def results(request, tmp_path_factory):
    engine = request.param
    if engine == "chainer" and MPI_MISSING:
        pytest.skip("no mpiexec: install Open MPI (README, Scaling out)")
    tmp = tmp_path_factory.mktemp(f"equivalence-{engine}")
    _run([sys.executable, str(WORKER), str(tmp / "one.npz"), engine], tmp)
    _two_ranks(engine, tmp / "two.npz", tmp)
    return dict(np.load(tmp / "one.npz")), dict(np.load(tmp / "two.npz"))


def test_two_ranks_train_what_one_process_trains(results):
    one, two = results
    cases = sorted({key.split("/")[0] for key in one})
    assert cases and set(cases) <= set(TOLERANCE)
    for case in cases:
        keys = [k for k in one if k.startswith(f"{case}/")]
        assert len(one[f"{case}/train_loss"]) == 2 and one[f"{case}/train_loss"][1] < one[f"{case}/train_loss"][0]
        for key in keys:
            np.testing.assert_allclose(two[key], one[key], rtol=0, atol=TOLERANCE[case], err_msg=key)


def test_chainer_refuses_synchronised_batchnorm_before_starting(tmp_path):
    result = run_cli([*TINY, "framework=chainer", "trainer.devices=2", "trainer.sync_batchnorm=true"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "trainer.sync_batchnorm" in result.stderr and "MultiNodeBatchNormalization" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------------- stopping


def _session_processes(session: int) -> List[int]:
    """Live processes of a session (the launcher's, started with start_new_session): its workers too."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(Path(stat).parent.name))
    return found


def _start(tmp_path: Path, framework_name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CNNRUN_DEBUG", None)
    args = [*TINY, *FRAMEWORKS[framework_name], "trainer.devices=2", "trainer.epochs=50", "trainer.patience=null",
            "trainer.batch_size=16", "trainer.log_every=1"]
    return subprocess.Popen(CNNRUN + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_training(process: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> None:
    """Until rank 0 has a RUNNING MLflow run and has finished its first epoch (every rank is then training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        if (tmp_path / "mlflow.db").exists():
            client, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                return
        time.sleep(1)
    raise AssertionError("training did not start")


def _rank_pids(launcher: int) -> List[int]:
    """The worker processes (python -m cnnrun, not the launcher, not mpiexec) in the launcher's session."""
    pids = []
    for pid in _session_processes(launcher):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if pid != launcher and b"cnnrun" in cmdline and Path(cmdline[0].decode()).name.startswith("python"):
            pids.append(pid)
    return pids


def _finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return out


@pytest.mark.parametrize("framework_name", ["tensorflow", "chainer"])
@pytest.mark.parametrize("how", ["rank crash", "Ctrl-C"])
def test_a_stopped_run_ends_every_rank_and_its_mlflow_run(framework_name, how, tmp_path):
    if framework_name == "chainer" and MPI_MISSING:
        pytest.skip("no mpiexec")
    process = _start(tmp_path, framework_name)
    try:
        _wait_for_training(process, tmp_path)
        ranks = _rank_pids(process.pid)
        assert len(ranks) == 2, ranks
        if how == "rank crash":
            os.kill(max(ranks), signal.SIGKILL)  # the later-started rank: not rank 0, which tracks the run
        else:
            os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out = _finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    expected_code, expected_status = (1, "FAILED") if how == "rank crash" else (130, "KILLED")
    assert process.returncode == expected_code, out[-3000:]
    assert _session_processes(process.pid) == [], "a worker outlived its launcher"
    _, runs = mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert [run.info.status for run in runs] == [expected_status], out[-3000:]
