"""Which launchers run jobs on other machines (cnnrun.sweep.launchers), and how a job in another process learns its
sweep's parent run: from the callback the launcher pickled with it, with no file from the sweep's folder."""

from __future__ import annotations

from pathlib import Path

import cloudpickle
import pytest
import yaml
from omegaconf import OmegaConf, open_dict, read_write

from cnnrun.sweep import job as sweep_job
from cnnrun.sweep.callback import SweepCallback
from cnnrun.sweep.launchers import local_store, runs_elsewhere
from cnnrun.sweep.state import SweepState
from tests.helpers import CONF


def shipped_launcher(name: str):
    return OmegaConf.create(yaml.safe_load((CONF / "hydra" / "launcher" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name, elsewhere", [("submitit_slurm", True), ("submitit_local", False), ("ray", True),
                                             ("ray_local", False)])
def test_shipped_launchers_say_whether_jobs_leave_this_machine(name, elsewhere):
    assert runs_elsewhere(shipped_launcher(name)) is elsewhere


def test_a_ray_launcher_runs_elsewhere_only_with_a_cluster_address():
    ray = shipped_launcher("ray")
    for address, elsewhere in [("head.cluster:6379", True), ("auto", True), (None, False), ("local", False)]:
        ray.ray.init.address = address
        assert runs_elsewhere(ray) is elsewhere, address
    basic = OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"})
    joblib = OmegaConf.create({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"})
    assert not runs_elsewhere(basic) and not runs_elsewhere(joblib)


@pytest.mark.parametrize("uri, local", [("sqlite:///mlflow.db", True), ("sqlite:////shared/mlflow.db", True),
                                        ("file:///tmp/mlruns", True), ("mlruns", True), ("/abs/mlruns", True),
                                        ("http://mlflow:5000", False), ("https://mlflow.example.org", False),
                                        ("postgresql+psycopg2://u@db/mlflow", False)])
def test_local_stores_are_files_on_this_machine(uri, local):
    assert local_store(uri) is local


@pytest.fixture
def multirun_job_config(tmp_path):
    """Hydra's config of sweep job 3, whose sweep folder holds no state file (another machine's view)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["optimizer.lr=0.1"], return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.job.num = 3
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "3")
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = previous
    sweep_job.know_state(None)
    sweep_job.begin(None)


def test_a_job_learns_the_parent_run_from_the_callback_pickled_with_it(multirun_job_config):
    callback = SweepCallback()  # as on_multirun_start leaves it in the main process
    callback.sweep_dir = Path(str(multirun_job_config.hydra.sweep.dir))
    callback.state = SweepState(parent_run_id="parent123", tracking_uri="http://mlflow:5000", experiment="e")
    in_the_job = cloudpickle.loads(cloudpickle.dumps(callback))  # what submitit and Ray do with it
    sweep_job.know_state(None)
    in_the_job.on_job_start(multirun_job_config)
    job = sweep_job.from_hydra()
    assert not (callback.sweep_dir / ".cnnrun").exists()  # nothing to read there
    assert job is not None and job.num == 3 and job.state is not None
    assert job.state.parent_run_id == "parent123" and job.state.tracking_uri == "http://mlflow:5000"
