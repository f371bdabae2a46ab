"""Data-parallel training on TensorFlow (and Keras on it) and on ChainerMN, through the CLI on the CPU.

``trainer.devices=2`` must train the same model as ``trainer.devices=1`` with the same global batch: the same
per-epoch losses in MLflow and the same final weights (1e-5 without batchnorm; 1e-4 with batchnorm synchronised
over the ranks). TensorFlow starts slowly, so each framework's runs are made once (module fixtures) and shared by
the assertions. A killed rank and a Ctrl-C must leave no RUNNING MLflow run and no process behind.
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
from typing import Dict, List

import numpy as np
import pytest

from tests.helpers import CNNRUN, mlflow_runs, run_cli
from tests.tiny import TINY

pytestmark = pytest.mark.slow

# Two epochs of 500 images in global batches of 96: five full batches and one of 20 (shards of 10 each).
COMMON = [*TINY, "trainer.epochs=2", "trainer.batch_size=96", "trainer.patience=null"]
# A batchnorm after the first convolution (without a bias there: batchnorm cancels it, and Adam's step on its
# nearly-zero gradient would be noise).
BATCHNORM = ["model.layers.0.bias=false", "model.layers.1={type:batchnorm}"]
FRAMEWORKS = {
    "tensorflow": ["framework=tensorflow"],
    "keras": ["framework=keras", "framework.backend=tensorflow"],
    "chainer": ["framework=chainer"],
}
MPI_MISSING = shutil.which("mpiexec") is None


def _train(workdir: Path, args: List[str]) -> Dict:
    """Train in ``workdir``; the run's per-epoch metrics and the final weights."""
    workdir.mkdir(parents=True)
    result = run_cli(args, workdir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(f"sqlite:///{workdir}/mlflow.db")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    history = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
               for key in ("train_loss", "val_loss")}
    from cnnrun.checkpoint import load

    (model,) = glob.glob(str(workdir / "outputs" / "**" / "model.safetensors"), recursive=True)
    return {"run": run, "history": history, "weights": load(model).weights, "output": result.stdout + result.stderr}


def _assert_same_training(single: Dict, parallel: Dict, tolerance: float) -> None:
    for key in ("train_loss", "val_loss"):
        assert len(single["history"][key]) == 2
        np.testing.assert_allclose(parallel["history"][key], single["history"][key], rtol=tolerance, atol=tolerance,
                                   err_msg=key)
    assert parallel["weights"].keys() == single["weights"].keys()
    for name, value in single["weights"].items():
        np.testing.assert_allclose(parallel["weights"][name], value, rtol=tolerance, atol=tolerance, err_msg=name)


@pytest.fixture(scope="module", params=list(FRAMEWORKS))
def framework(request):
    if request.param == "chainer" and MPI_MISSING:
        pytest.skip("no mpiexec: install Open MPI (README, Scaling out)")
    return request.param


@pytest.fixture(scope="module")
def plain_runs(framework, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"plain-{framework}")
    args = [*COMMON, *FRAMEWORKS[framework]]
    return _train(base / "one", [*args, "trainer.devices=1"]), _train(base / "two", [*args, "trainer.devices=2"])


def test_two_ranks_train_like_one_process(plain_runs):
    single, parallel = plain_runs
    _assert_same_training(single, parallel, 1e-5)
    assert parallel["run"].data.params["world_size"] == "2" and single["run"].data.params["world_size"] == "1"
    assert parallel["output"].count("epoch 2/2") == 1  # rank 0 alone prints the epoch table


@pytest.mark.parametrize("framework_name", ["tensorflow", "keras"])
def test_synchronised_batchnorm_trains_like_one_process(framework_name, tmp_path):
    args = [*COMMON, *BATCHNORM, *FRAMEWORKS[framework_name]]
    single = _train(tmp_path / "one", [*args, "trainer.devices=1"])
    parallel = _train(tmp_path / "two", [*args, "trainer.devices=2", "trainer.sync_batchnorm=true"])
    _assert_same_training(single, parallel, 1e-4)


def test_chainer_refuses_synchronised_batchnorm_before_starting(tmp_path):
    result = run_cli([*TINY, "framework=chainer", "trainer.devices=2", "trainer.sync_batchnorm=true"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "trainer.sync_batchnorm" in result.stderr and "MultiNodeBatchNormalization" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db")[1]


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
