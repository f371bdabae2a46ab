"""CPU threads and GPUs for parallel sweep jobs (cnnrun.sweep.resources), and the launcher's parallelism."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnrun.sweep import resources
from cnnrun.sweep.job import SweepJob, parallel_jobs


def job(num: int = 0, parallel: int = 3) -> SweepJob:
    return SweepJob(num=num, overrides=[], sweep_dir=Path("/tmp/s"), output_dir=Path("/tmp/s/0"), parallel=parallel)


def device(name="auto", index=None, threads=None):
    return {"task": "train", "device": {"name": name, "index": index, "threads": threads}}


@pytest.mark.parametrize("cores, parallel, expected", [(2, 3, 1), (16, 3, 5), (16, 1, 16), (8, 8, 1), (1, 4, 1)])
def test_threads_per_job_share_the_cores(cores, parallel, expected):
    assert resources.threads_per_job(cores, parallel) == expected


def test_each_parallel_job_gets_its_own_gpu_round_robin():
    assert [resources.gpu_for_job(n, 4) for n in range(10)] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [resources.gpu_for_job(n, 2) for n in range(4)] == [0, 1, 0, 1]
    assert resources.gpu_for_job(5, 1) is None and resources.gpu_for_job(5, 0) is None


def test_assign_fills_only_what_the_user_left_open():
    raw = resources.assign(device("auto"), job(num=5, parallel=3), cores=12, gpus=4)
    assert raw["device"] == {"name": "auto", "index": 1, "threads": 4}
    assert resources.assign(device("cuda"), job(num=2), cores=2, gpus=2)["device"]["index"] == 0
    assert resources.assign(device("cpu"), job(num=1), cores=2, gpus=4)["device"] == \
        {"name": "cpu", "index": None, "threads": 1}
    # an explicit choice wins
    assert resources.assign(device("cuda:1"), job(num=2), cores=2, gpus=4)["device"]["index"] is None
    assert resources.assign(device("cuda", index=3), job(num=2), cores=2, gpus=4)["device"]["index"] == 3
    assert resources.assign(device(threads=7), job(), cores=2, gpus=0)["device"]["threads"] == 7


def test_assign_leaves_single_runs_and_sequential_sweeps_alone():
    raw = device("auto")
    assert resources.assign(raw, None, cores=2, gpus=4) is raw
    assert resources.assign(raw, job(parallel=1), cores=2, gpus=4) is raw


@pytest.mark.parametrize("visible, expected", [("0,1,2", 3), ("", 0), ("-1", 0), ("3", 1)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    resources.visible_gpus.cache_clear()
    try:
        assert resources.visible_gpus() == expected
    finally:
        resources.visible_gpus.cache_clear()


def test_parallel_jobs_come_from_the_joblib_launcher(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert parallel_jobs({"_target_": joblib, "n_jobs": 3}) == 3
    assert parallel_jobs({"_target_": joblib, "n_jobs": -1}) == 8
    assert parallel_jobs({"_target_": joblib, "n_jobs": -2}) == 7
    assert parallel_jobs({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}) == 1
