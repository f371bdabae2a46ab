"""Sweeps through the cluster launchers, with what local sweeps keep: one MLflow parent run with a child per job, a
failed job recorded FAILED while the others finish, the summary table, finished jobs skipped on a re-run.

- submitit_local: submitit's code path for SLURM (jobs pickled to a folder, run in their own processes, results
  read back), on this machine.
- ray: a Ray cluster started here on 127.0.0.1 with 2 CPUs (``ray start --head``, one per module, stopped with its
  whole process group), tracked in a real ``mlflow server``, as jobs on other machines must be. Optuna trials run
  on it two at a time.
- A local tracking store with a launcher whose jobs run elsewhere is refused before any job.
"""

from __future__ import annotations

import csv
import os
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import mlflow_runs, run_cli
from tests.tiny import TINY, free_port

pytest.importorskip("submitit", reason="the cluster extra (pip install 'cnnrun[cluster]')")
pytest.importorskip("ray", reason="the cluster extra (pip install 'cnnrun[cluster]')")

# job 0 trains; job 1 diverges; jobs 2 and 3 have an invalid model (a config error before any run opens)
GRID = [a for a in TINY if not a.startswith("model.layers.0.filters")] + [
    "optimizer=sgd", "model.layers.0.filters=4,-1", "optimizer.lr=0.01,1e12"]


def _sweep(uri: str, experiment: str):
    client, runs = mlflow_runs(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("cnnrun.task") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cnnrun.task") == "train"]
    return client, parents, children


def _grid_sweep_twice(args, workdir: Path, uri: str, experiment: str, launcher: str, env=None) -> None:
    """The 2×2 sweep, then the same command again: what both launchers must keep."""
    first = run_cli(args, workdir, env)
    assert first.returncode == 2, first.stderr[-3000:]  # the failures, reported after every job ran
    assert "Traceback" not in first.stderr and "training diverged" in first.stderr
    _, (parent,), children = _sweep(uri, experiment)
    assert parent.data.tags["cnnrun.sweep.launcher"] == launcher and parent.info.status == "FAILED"
    assert sorted(int(c.data.tags["cnnrun.sweep.job"]) for c in children) == [0, 1, 2, 3]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    (ok,) = [c for c in children if c.info.status == "FINISHED"]
    assert ok.data.tags["cnnrun.sweep.job"] == "0"
    errors = sorted(c.data.tags["cnnrun.error"] for c in children if c.info.status == "FAILED")
    assert len(errors) == 3 and sum("diverged" in e for e in errors) == 1 and sum("filters" in e for e in errors) == 2
    assert parent.data.metrics["jobs_total"] == 4 and parent.data.metrics["jobs_failed"] == 3
    assert parent.data.tags["cnnrun.sweep.best_run_id"] == ok.info.run_id
    # the table at the end (every job's record came back from its own process), failures under it
    assert "best first by kept_val_acc" in first.stderr and first.stderr.count(" FAILED: ") == 3
    (summary,) = workdir.glob("multirun/*/*/sweep_summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [(r["job"], r["status"]) for r in rows][0] == ("0", "FINISHED")
    assert sorted(r["status"] for r in rows[1:]) == ["FAILED"] * 3

    # the same command again: the finished job is skipped (its own log says so), the others run again
    second = run_cli(args, workdir, env)
    assert second.returncode == 2, second.stderr[-3000:]
    _, parents, children = _sweep(uri, experiment)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the same parent run continues
    assert len(children) == 4 + 3 and len([c for c in children if c.info.status == "FINISHED"]) == 1
    summaries = sorted(workdir.glob("multirun/*/*/sweep_summary.csv"))
    skipped = list(csv.DictReader(summaries[-1].open()))[0]
    assert (skipped["job"], skipped["status"], skipped["run"]) == ("0", "SKIPPED", ok.info.run_id)


@pytest.mark.slow
def test_submitit_sweep_keeps_parent_children_failures_summary_and_skips(workdir, tracking_uri):
    args = ["-m", "hydra/launcher=submitit_local", f"tracking.uri={tracking_uri}", *GRID]
    _grid_sweep_twice(args, workdir, tracking_uri, "cnnrun", "local")
    # each job ran in a process of its own, started by submitit, which kept its log in the sweep's folder
    logs = list(workdir.glob("multirun/*/*/.submitit/*/*_log.out"))
    assert len(logs) >= 4 and len({p.parent.name for p in logs}) >= 4


# --- Ray ------------------------------------------------------------------------------------------------------


class RayCluster:
    """``ray start --head --block`` in its own session: every Ray process it starts is in its process group."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Ray puts unix sockets under its temp dir: a short path (107 characters at most for a socket)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.log = root / "ray-head.log"
        self.token = secrets.token_hex(32)
        ray = Path(sys.executable).with_name("ray")
        command = [str(ray)] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        command += ["start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
                    "--node-ip-address", "127.0.0.1", "--port", str(self.port), "--include-dashboard", "false",
                    "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=root, env={**os.environ, **self.env()})

    def env(self):
        """For the head node and every cnnrun that connects: Ray's token authentication (on by default in Ray 2.60)
        with a token of this cluster's own, and every Ray server on 127.0.0.1 only (Ray's single-machine
        mode; otherwise they listen on all interfaces)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def wait(self, timeout: float = 180) -> "RayCluster":
        import ray

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            if "Ray runtime started" in self.log.read_text():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Ray did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Kill the whole group at once (GCS, raylet, agents, workers: nothing of it is worth a clean shutdown),
        also when ``ray start`` itself has already exited."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("ray"))
    try:
        yield cluster.wait()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    from tests.tracking.conftest import MlflowServer

    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root)
    try:
        yield server.wait()
    finally:
        server.kill()


@pytest.mark.slow
def test_ray_sweep_keeps_parent_children_failures_summary_and_skips(workdir, ray_cluster, tracking_server):
    args = ["-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_cluster.address}",
            f"tracking.uri={tracking_server.url}", "tracking.experiment=ray-grid", *GRID]
    _grid_sweep_twice(args, workdir, tracking_server.url, "ray-grid", "ray", ray_cluster.env())


@pytest.mark.slow
def test_optuna_trials_run_in_parallel_on_ray(workdir, ray_cluster, tracking_server):
    args = [a for a in TINY if not a.startswith("model.layers.5.units")]
    result = run_cli(["-m", "hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                      "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_cluster.address}", *args,
                      f"tracking.uri={tracking_server.url}", "tracking.experiment=ray-optuna",
                      "model.layers.5.units=choice(16, 32)"], workdir, ray_cluster.env())
    assert result.returncode == 0, result.stderr[-3000:]
    _, (parent,), children = _sweep(tracking_server.url, "ray-optuna")
    assert parent.data.tags["cnnrun.sweep.sweeper"] == "optuna" and parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # one batch of two trials, trained at the same time: each started before the other ended
    first, second = sorted(children, key=lambda c: c.info.start_time)
    assert second.info.start_time < first.info.end_time, [(c.info.start_time, c.info.end_time) for c in children]
    assert len({c.data.tags["cnnrun.sweep.job"] for c in children}) == 2


@pytest.mark.parametrize("launcher", [["hydra/launcher=submitit_slurm"],
                                      ["hydra/launcher=ray", "hydra.launcher.ray.init.address=127.0.0.1:6379"]],
                         ids=["slurm", "ray"])
def test_a_local_tracking_store_is_refused_for_jobs_on_other_machines(workdir, tracking_uri, launcher):
    result = run_cli(["-m", *launcher, f"tracking.uri={tracking_uri}", *TINY, "optimizer.lr=1e-3,2e-3"], workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("tracking.uri: ") == 1
    assert f"tracking.uri: '{tracking_uri}' is a file on this machine, but {launcher[0]} runs jobs on" \
        in result.stderr
    assert "tracking.uri=http://HOST:5000" in result.stderr and f"[command line: tracking.uri={tracking_uri}]" \
        in result.stderr
    assert not (workdir / "multirun").exists() and not (workdir / "mlflow.db").exists()  # nothing submitted
    assert "ConfigStore schema" not in result.stderr  # Hydra's warning about conf/hydra/launcher/'s names


def test_an_unreachable_ray_cluster_is_a_user_error(workdir):
    address = f"127.0.0.1:{free_port()}"
    result = run_cli(["-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}",
                      "tracking.enabled=false", *TINY, "optimizer.lr=1e-3,2e-3"], workdir, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cnnrun: hydra.launcher.ray.init.address={address}: nothing answers there (Connection refused)" \
        in result.stderr and "ray start --head" in result.stderr
    assert not list(workdir.glob("multirun/*/*/0-*"))  # no job ran
