"""Data-parallel training on TensorFlow (and Keras on it, tf.distribute) and on Chainer (ChainerMN), on the CPU.

Two ranks train what one process trains, with global batches that no number of ranks divides: the same per-epoch
training and validation losses and final weights (1e-5 without batchnorm; 1e-4 with batchnorm synchronised over
the ranks), through tests/distributed/trainer_worker.py started as the engines' launchers start cnnrun (TF_CONFIG
workers; mpiexec). TensorFlow starts slowly, so one launch serves every TensorFlow and Keras case. Through the CLI
with ``trainer.devices=2``: a killed rank and a Ctrl-C leave no RUNNING MLflow run and no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from tests.distributed.test_processes import RUN, kill_rank_1, stopped_run, terminate_rank_1
from tests.helpers import ROOT, mlflow_runs, run_launcher

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("trainer_worker.py")

FRAMEWORKS = {
    "tensorflow": ["framework=tensorflow"],
    "keras": ["framework=keras", "framework.backend=tensorflow"],
    "chainer": ["framework=chainer"],
}
MPI_MISSING = shutil.which("mpiexec") is None
TOLERANCE = {"tensorflow": 1e-5, "keras-tensorflow": 1e-5, "chainer": 1e-5,
             "tensorflow-syncbn": 1e-4, "keras-tensorflow-syncbn": 1e-4,
             "tensorflow-fp16": 1e-3}  # fp16 (loss scaling) rounds each shard's sums: measured 4.1e-4


def _run(command: List[str], tmp_path: Path, env: Optional[Dict[str, str]] = None) -> None:
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    done = run_launcher(command, tmp_path, env, timeout=600)  # mpiexec: SIGTERM on timeout, which stops its ranks
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
    cases = sorted({key.split("/")[0] for key in one} - {"world"})  # world/: the world, not a case
    assert cases and set(cases) <= set(TOLERANCE)
    for case in cases:
        keys = [k for k in one if k.startswith(f"{case}/")]
        assert len(one[f"{case}/train_loss"]) == 2 and one[f"{case}/train_loss"][1] < one[f"{case}/train_loss"][0]
        for key in keys:
            np.testing.assert_allclose(two[key], one[key], rtol=0, atol=TOLERANCE[case], err_msg=key)


# --------------------------------------------------------------------------------------------------- stopping


def ctrl_c(launcher: subprocess.Popen, ranks) -> None:
    launcher.send_signal(signal.SIGINT)  # Ctrl-C in its terminal (the workers run in sessions of their own)


# (how it is stopped, exit code, MLflow status); SIGTERM to one rank only on TensorFlow, whose launcher is cnnrun's
# own (mpiexec's handling of it is Open MPI's).
STOPS = {"rank crash": (kill_rank_1, 1, "FAILED"), "Ctrl-C": (ctrl_c, 130, "KILLED"),
         "SIGTERM to one rank": (terminate_rank_1, 130, "KILLED")}


@pytest.mark.parametrize("framework_name, how", [
    ("tensorflow", "rank crash"), ("tensorflow", "Ctrl-C"), ("tensorflow", "SIGTERM to one rank"),
    ("chainer", "rank crash"), ("chainer", "Ctrl-C"),
])
def test_a_stopped_run_ends_every_rank_and_its_mlflow_run(framework_name, how, tmp_path):
    if framework_name == "chainer" and MPI_MISSING:
        pytest.skip("no mpiexec")
    stop, expected_code, expected_status = STOPS[how]
    code, output, _, _ = stopped_run(RUN + FRAMEWORKS[framework_name], tmp_path, stop)
    assert code == expected_code, output[-4000:]
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [run.info.status for run in runs] == [expected_status], output[-4000:]
    if expected_status == "KILLED":
        assert output.count("state saved") == 1, output[-4000:]  # rank 0 saved once
