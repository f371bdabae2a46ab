"""Which processes train together: one :class:`World` value read from the environment a launcher set.

A launcher that started this process as one rank of several says so in environment variables, each in its own
words: torchrun and torch's elastic agent (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), MPI (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Hydra's and Slurm's PMI
``PMI_RANK``/``PMI_SIZE``), and TensorFlow's ``TF_CONFIG`` (a cluster of workers and this task's index). Nothing
set means one process: :data:`SINGLE`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from cnnrun.errors import UserError

TORCHRUN, MPI, TF_CONFIG = "torchrun", "mpi", "tf_config"


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one model together."""

    rank: int = 0  # 0 … size-1, across every machine
    size: int = 1
    local_rank: int = 0  # on this machine: picks the GPU
    local_size: int = 1  # processes on this machine: shares its CPU cores
    source: Optional[str] = None  # who started it: TORCHRUN, MPI, TF_CONFIG (None: a single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, tracks and writes files."""
        return self.rank == 0

    @property
    def started(self) -> bool:
        """Started by a launcher as one of several processes (it joins that world rather than launching one)."""
        return self.source is not None


SINGLE = World()


def detect_world(env: Optional[Mapping[str, str]] = None) -> World:
    """The world this process was started into, from ``env`` (default: os.environ); :data:`SINGLE` when none."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _checked(TORCHRUN, env, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if "OMPI_COMM_WORLD_RANK" in env:
        return _checked(MPI, env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                        "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in env:
        return _checked(MPI, env, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if env.get("TF_CONFIG"):
        return _from_tf_config(env["TF_CONFIG"], env)
    return SINGLE


def _integer(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"environment variable {key}={value!r}: expected a whole number (set by the launcher "
                        "that started this process)") from None


def _checked(source: str, env, rank_key: str, size_key: str, local_rank_key: str, local_size_key: str) -> World:
    rank, size = _integer(env, rank_key), _integer(env, size_key)
    local_rank = _integer(env, local_rank_key, default=rank)
    local_size = _integer(env, local_size_key, default=size)
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size):
        raise UserError(f"{rank_key}={rank}, {size_key}={size}, {local_rank_key}={local_rank}: not a rank of a "
                        "world (expected 0 <= rank < size); check how this process was launched")
    return World(rank, size, local_rank, local_size, source)


def _from_tf_config(text: str, env: Mapping[str, str]) -> World:
    try:
        config = json.loads(text)
        workers = list(config["cluster"]["worker"])
        task = config["task"]
        index = int(task["index"]) if task.get("type") == "worker" else -1
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"environment variable TF_CONFIG is not a worker cluster's JSON ({err}); "
                        'expected {"cluster": {"worker": [...]}, "task": {"type": "worker", "index": N}}') from None
    if not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG: task {task} is not one of the {len(workers)} workers it lists")
    # TF_CONFIG does not say which workers share a machine: a launcher that runs several on one says so with
    # LOCAL_RANK / LOCAL_WORLD_SIZE (default: one worker per machine).
    return World(index, len(workers), _integer(env, "LOCAL_RANK", 0), _integer(env, "LOCAL_WORLD_SIZE", 1), TF_CONFIG)
