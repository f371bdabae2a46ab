"""The TensorFlow engine: TF_CONFIG workers and ``tf.distribute.MultiWorkerMirroredStrategy``, for
framework=tensorflow and for Keras on its TensorFlow backend (whose model runs inside the TensorFlow backend's
train step, so it is made data-parallel the same way).

Every rank is one worker process with one device. The workers find each other through ``TF_CONFIG``,
TensorFlow's own cluster spec: ``trainer.devices=N`` starts N local workers on free ports of 127.0.0.1, and a
command started with ``TF_CONFIG`` already set (by a cluster manager, or by hand on each machine) joins as the
worker it names. Each train step runs in the strategy's replica context and sums the gradients of every rank
(ring all-reduce over gRPC on the CPU, NCCL between GPUs) before the update; each rank's loss is its summed loss
over the global batch's size, so the sum is the global batch's mean-loss gradient however the batch divides.

One process per GPU, rather than ``MirroredStrategy``'s one process driving every GPU of a machine, keeps the
shard of each global batch, the metrics and the rank-0-only logging the same as in every other framework.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sys
from typing import Any, Dict, List, Sequence

import numpy as np

from cnnrun.distributed import COLLECTIVE_TIMEOUT_S, WorkersFailed
from cnnrun.distributed.local_workers import run_workers
from cnnrun.distributed.world import World
from cnnrun.errors import TrainingInterrupted

LAUNCHER = "TF_CONFIG workers (tf.distribute.MultiWorkerMirroredStrategy)"


# --------------------------------------------------------------------------------------------------- launch


def free_ports(count: int) -> List[int]:
    """Ports free on 127.0.0.1 now (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_environments(nprocs: int) -> List[Dict[str, str]]:
    """One environment per local worker: TF_CONFIG naming it in a cluster on 127.0.0.1, and its local rank."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(nprocs)]}
    environments = []
    for rank in range(nprocs):
        env = dict(os.environ)
        env.update(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}}),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs))
        environments.append(env)
    return environments


def launch(nprocs: int, args: Sequence[str]) -> None:
    """``python -m cnnrun *args`` in ``nprocs`` local TF_CONFIG workers; wait for them."""
    outcome = run_workers([sys.executable, "-m", "cnnrun", *args], worker_environments(nprocs))
    if outcome.signal is not None:
        raise TrainingInterrupted(f"stopped by {outcome.signal}: every rank was told to stop")
    if outcome.interrupted:
        raise TrainingInterrupted("the workers were stopped by a signal; rank 0 saved the state")
    if outcome.failures:
        raise WorkersFailed(outcome.describe())


# --------------------------------------------------------------------------------------------------- join


class TensorFlowCollective:
    """Sums, gathers and broadcasts through the strategy's collectives. Each operation is one compiled function
    over flat vectors of any length (traced once per dtype), not an eager call that TensorFlow would retrace for
    every new shape."""

    def __init__(self, world: World, strategy):
        self.world = world
        self.strategy = strategy
        self._sum = self._compiled(gather=False, dtype="float64")
        self._gathers = {}  # dtype → compiled all-gather

    def _compiled(self, gather: bool, dtype: str):
        from cnnrun.backends.tensorflow import tf

        def replica(x):
            x = tf.identity(x)  # placed on the replica's device: a collective reduces towards its inputs' devices
            context = tf.distribute.get_replica_context()
            return context.all_gather(x, axis=0) if gather else context.all_reduce(tf.distribute.ReduceOp.SUM, x)

        @tf.function(input_signature=[tf.TensorSpec((None,), dtype)])
        def collective(x):
            return self.strategy.run(replica, args=(x,))

        return lambda values: collective(values).numpy()

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, np.float64)
        return self._sum(values.reshape(-1)).reshape(values.shape)

    def all_gather(self, rows: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        longest = max(sizes)
        padded = np.zeros((longest, *rows.shape[1:]), rows.dtype)  # the collective takes equal shapes
        padded[: len(rows)] = rows
        dtype = padded.dtype.name
        if dtype not in self._gathers:
            self._gathers[dtype] = self._compiled(gather=True, dtype=dtype)
        parts = self._gathers[dtype](padded.reshape(-1)).reshape(len(sizes), longest, *rows.shape[1:])
        return np.concatenate([part[:size] for part, size in zip(parts, sizes)])

    def broadcast(self, value: Any) -> Any:
        data = np.frombuffer(pickle.dumps(value), np.uint8) if self.world.is_main else np.zeros(0, np.uint8)
        length = int(self.all_sum(np.array([len(data)]))[0])
        buffer = np.zeros(length, np.float64)  # bytes as float64: adding the other ranks' zeros keeps them exact
        buffer[: len(data)] = data
        return pickle.loads(self.all_sum(buffer).astype(np.uint8).tobytes())

    def close(self) -> None:
        pass  # the strategy's servers stop with the process


def join(world: World, device) -> TensorFlowCollective:
    """Join the cluster TF_CONFIG describes (waits until every worker is up), on this rank's one device.

    On a GPU machine the rank is allowed only its own GPU (the strategy would otherwise make a replica of every
    GPU it sees); that must happen before TensorFlow initialises its devices, so before any runner exists."""
    from cnnrun.backends.tensorflow import GPUS, tf

    if device.kind == "cpu" or not GPUS:
        tf.config.set_visible_devices([], "GPU")
    elif device.cuda_index < len(GPUS):
        tf.config.set_visible_devices(GPUS[device.cuda_index], "GPU")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # the strategy logs every collective it sets up
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return TensorFlowCollective(world, strategy)


# --------------------------------------------------------------------------------------------------- wrap


class TensorFlowParallel:
    """What :func:`wrap` returns: the global batch's size per step, and rank 0's running statistics shared."""

    def __init__(self, runner, collective: TensorFlowCollective):
        self.runner = runner
        self.collective = collective
        self.state = [var for name, var in runner.net.variables.by_name.items()
                      if name not in set(runner.net.variables.trainable_names)]  # batchnorm running statistics

    def set_shard(self, size: int, total: int) -> None:
        self.runner.global_batch = total

    def share_state(self) -> None:
        values = self.collective.broadcast([var.numpy() for var in self.state])
        for var, value in zip(self.state, values):
            var.assign(value)


def wrap(runner, collective: TensorFlowCollective, sync_batchnorm: bool) -> TensorFlowParallel:
    """Make a TensorFlow runner (framework=tensorflow, or Keras on TensorFlow) one replica of the strategy."""
    from cnnrun.backends.tensorflow import batch_moments

    if sync_batchnorm:
        if hasattr(runner.net, "keras_model"):
            from cnnrun.backends import keras as keras_backend

            keras_backend.set_batch_moments(lambda x, axes: batch_moments(x, axes, synced=True))
        else:
            runner.net.synchronise_batchnorm()
    runner.distribute(collective.strategy)
    return TensorFlowParallel(runner, collective)


__all__ = ["LAUNCHER", "join", "launch", "wrap"]
