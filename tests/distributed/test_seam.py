"""The framework-neutral pieces of data-parallel training, without starting processes: which world a launcher's
environment describes, each rank's rows, what the config may ask for, and what the launcher tells its workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnrun.config import DeviceConfig
from cnnrun.distributed import ENGINES, devices_problems, engine_key, rank_device
from cnnrun.distributed.launch import LAUNCHER_PID, rank_hydra_args, worker_args
from cnnrun.distributed.session import check_batches
from cnnrun.distributed.shard import loss_weight, shard_bounds, shard_sizes, take_shard
from cnnrun.distributed.world import MPI, SINGLE, TF_CONFIG, TORCHRUN, World, detect_world
from cnnrun.errors import UserError

WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                   "TF_CONFIG", LAUNCHER_PID)


@pytest.fixture(autouse=True)
def no_world(monkeypatch):
    """This process as one alone, whatever launched pytest."""
    for key in WORLD_VARIABLES:
        monkeypatch.delenv(key, raising=False)


@pytest.mark.parametrize("env,expected", [
    ({}, SINGLE),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, World(3, 8, 1, 2, TORCHRUN)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, World(2, 4, 0, 2, MPI)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, World(1, 2, 1, 2, MPI)),  # no local variables: all on this machine
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 2}})},
     World(2, 3, 0, 1, TF_CONFIG)),
])
def test_each_launchers_variables_describe_one_world(env, expected):
    world = detect_world(env)
    assert world == expected
    assert world.is_main == (expected.rank == 0) and world.started == (expected.source is not None)


@pytest.mark.parametrize("env,fragment", [
    ({"RANK": "two", "WORLD_SIZE": "4"}, "RANK='two'"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "not a rank of a world"),
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG is not a worker cluster's JSON"),
    ({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}})},
     "is not one of the 1 workers"),
])
def test_a_broken_launcher_environment_is_a_clear_error(env, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace("{", r"\{")):
        detect_world(env)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 9, 11, 64])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_cover_the_batch_in_order_and_their_weighted_mean_is_the_batchs(n, size):
    rows = np.arange(n)
    shards = [take_shard(rows, rank, size) for rank in range(size)]
    assert np.array_equal(np.concatenate(shards), rows)  # contiguous, in rank order, every row once
    assert [len(s) for s in shards] == shard_sizes(n, size)
    assert max(shard_sizes(n, size)) - min(shard_sizes(n, size)) <= 1
    assert [shard_bounds(n, r, size)[0] for r in range(size)] == list(np.cumsum([0, *shard_sizes(n, size)[:-1]]))
    if n:
        values = np.random.default_rng(n).normal(size=n)
        weights = [loss_weight(len(s), n, size) for s in shards]
        per_rank_means = [values[s].mean() if len(s) else 0.0 for s in shards]
        # what an engine that averages ranks' gradients computes, for a loss linear in the rows
        assert np.mean([w * m for w, m in zip(weights, per_rank_means)]) == pytest.approx(values.mean(), abs=1e-12)


def test_every_batch_must_give_each_rank_a_row():
    check_batches(500, 48, 2)  # the last batch holds 20
    check_batches(101, 50, 2)  # a last batch of one joins the one before (51)
    with pytest.raises(UserError, match="trainer.batch_size=48 on 3 processes: the epoch's smallest batch holds 2"):
        check_batches(98, 48, 3)


def _raw(**trainer):
    return {"task": "train", "framework": {"name": "torch"}, "trainer": {"devices": 1, **trainer}}


def test_devices_are_refused_for_frameworks_without_an_engine_and_the_message_lists_those_with_one(monkeypatch):
    for framework in ({"name": "torch"}, {"name": "tensorflow"}, {"name": "chainer"},
                      {"name": "keras", "backend": "torch"}, {"name": "keras", "backend": "tensorflow"}):
        assert devices_problems({**_raw(devices=2), "framework": framework}) == [], framework
    monkeypatch.delitem(ENGINES, "keras:tensorflow")
    keras_tf = {**_raw(devices=2), "framework": {"name": "keras", "backend": "tensorflow"}}
    (problem,) = devices_problems(keras_tf)
    assert problem.key == "trainer.devices"
    assert problem.message.startswith("framework=keras with framework.backend=tensorflow cannot train on several")
    assert problem.message.endswith("these can: framework=torch, framework=tensorflow, "
                                    "framework=keras with framework.backend=torch, framework=chainer")
    assert devices_problems({**_raw(devices=2), "task": "eval"}) == []  # other tasks run in one process


def test_every_engine_has_cases_in_the_equivalence_worker():
    from tests.distributed.trainer_worker import CASES

    assert {parallel.module.rsplit(".", 1)[1] for parallel in ENGINES.values()} == set(CASES)
    tested = {engine_key(framework, options) for cases in CASES.values() for _, framework, options, _, _ in cases}
    assert tested == set(ENGINES)


def test_chainer_refuses_synchronised_batchnorm_and_says_why():
    chainer = {**_raw(devices=2, sync_batchnorm=True), "framework": {"name": "chainer"}}
    (problem,) = devices_problems(chainer)
    assert problem.key == "trainer.sync_batchnorm" and "MultiNodeBatchNormalization" in problem.message
    assert devices_problems({**chainer, "trainer": {"devices": 2, "sync_batchnorm": False}}) == []
    assert devices_problems({**_raw(devices=2, sync_batchnorm=True), "framework": {"name": "tensorflow"}}) == []


def test_under_a_launcher_devices_is_the_launchers_count_or_left_at_one(monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert devices_problems(_raw(devices=1)) == [] and devices_problems(_raw(devices=2)) == []
    (problem,) = devices_problems(_raw(devices=4))
    assert "started by torchrun as one of 2 on this machine" in problem.message
    (problem,) = devices_problems({**_raw(), "framework": {"name": "chainer"}})
    assert "framework=chainer joins worlds started by mpi" in problem.message
    assert "this process was started by torchrun" in problem.message


def test_each_local_rank_takes_its_own_gpu_and_a_share_of_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    world = World(rank=5, size=8, local_rank=1, local_size=4, source=TORCHRUN)
    assert rank_device(DeviceConfig(name="cuda:2"), world).cuda_index == 3
    assert rank_device(DeviceConfig(name="cpu"), world).threads == 2
    assert rank_device(DeviceConfig(name="cpu", threads=3), world).threads == 3
    assert rank_device(DeviceConfig(name="cuda", index=1), SINGLE) == DeviceConfig(name="cuda", index=1)


def test_workers_run_the_launchers_command_in_its_output_folder():
    argv = ["trainer.devices=2", "hydra.run.dir=mine", "trainer.resume=last", "+trainer.resume=x", "model=resnet_lite"]
    args = worker_args(argv, Path("/out/it's here"), "/ckpt/last.safetensors")
    assert args == ["trainer.devices=2", "model=resnet_lite", r"hydra.run.dir='/out/it\'s here'",
                    "hydra.output_subdir=null", "hydra/job_logging=none", "trainer.resume='/ckpt/last.safetensors'"]


def test_only_rank_0_of_a_world_cnnrun_did_not_launch_gets_an_output_folder(monkeypatch):
    assert rank_hydra_args() == []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_hydra_args() == []
    monkeypatch.setenv("RANK", "1")
    assert rank_hydra_args() == ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none"]
    monkeypatch.setenv(LAUNCHER_PID, "1")  # cnnrun's own workers are told where to go by worker_args
    assert rank_hydra_args() == []
