"""Data-parallel training: several processes (ranks) train one model, each on its shard of every global batch.

How a run becomes several processes
    ``trainer.devices=N`` (default 1) on one machine: the command composes and checks its config once, then hands
    itself to the framework's own launcher (its *engine*'s :func:`launch`), which starts N local workers running the
    same command; that process waits, and ends the MLflow run its workers left open if one was killed
    (:mod:`cnnrun.distributed.launch`). A command that a launcher already started as one rank of several
    (torchrun, mpiexec, TF_CONFIG: see :func:`~cnnrun.distributed.world.detect_world`) joins that world instead.

What every rank does
    The same seeded global batches as one process would (``trainer.batch_size`` is the global batch); each rank
    keeps its contiguous shard (:mod:`cnnrun.distributed.shard`) inside :class:`~cnnrun.distributed.runner.
    ShardedRunner`, so the trainer and the data pipeline hand it whole global batches and never change. Training
    metrics are summed over ranks at each sync; validation and test are sharded too, and each rank receives every
    rank's logits (gathered in rank order), so the metrics, the early-stopping decision and the confusion matrix are
    exactly one process's, on every rank. A stop (Ctrl-C, SIGTERM, ``trainer.max_time``) takes effect at the next
    sync point (every ``trainer.log_every`` steps) on all ranks at once, agreed through the collective. Only rank 0
    (``World.is_main``) prints the epoch table, talks to MLflow and writes checkpoints and artifacts; the run
    records ``world_size``. Checkpoints hold the one model (ranks keep identical weights and optimizer state), so a
    run written by N ranks resumes on M.

What an engine provides (one module per framework, listed in :data:`ENGINES`; imported only when used)
    ``launch(nprocs: int, args: Sequence[str]) -> None``
        Start ``nprocs`` local workers running ``python -m cnnrun *args``, each with environment variables that
        :func:`detect_world` reads, and wait for them. Raise :class:`WorkersFailed` when one fails (after stopping
        the others) and :class:`~cnnrun.errors.TrainingInterrupted` when a signal stopped them.
    ``join(world: World, device: DeviceConfig) -> Collective``
        Connect this process to its world (a process group, a strategy, a communicator), on ``device`` (already
        this rank's: :func:`rank_device`). The :class:`~cnnrun.distributed.collective.Collective` it returns sums,
        gathers and broadcasts NumPy values across ranks, and fails within :data:`COLLECTIVE_TIMEOUT_S` seconds
        when a rank is gone.
    ``wrap(runner, collective, sync_batchnorm: bool) -> Parallel``
        Make ``runner.train_step`` data-parallel (gradients averaged over ranks before the update; batchnorm
        statistics over the global batch when ``sync_batchnorm``). The returned object has
        ``set_shard(size, total)``, called before each step: this rank's rows and the global batch's, so the
        engine can weight this rank's loss (:func:`~cnnrun.distributed.shard.loss_weight` when it averages
        gradients); and ``share_state()``, called before evaluating: every rank takes rank 0's non-trained state
        (batchnorm running statistics) so all ranks predict with the model rank 0 saves.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, List, Mapping, Optional

from cnnrun.distributed.world import MPI, SINGLE, TF_CONFIG, TORCHRUN, World, detect_world
from cnnrun.errors import Problem, UserError

# The collective operations' time limit: a rank that stops answering (hung, or gone without closing its
# connections) makes the others fail after this long instead of waiting forever. A rank that crashes closes its
# connections, and the others fail at their next collective operation, within seconds.
COLLECTIVE_TIMEOUT_S = 300

# Engine key (see engine_key) → the module implementing launch/join/wrap.
ENGINES: Dict[str, str] = {
    "torch": "cnnrun.distributed.torch",
    "keras:torch": "cnnrun.distributed.torch",
    "tensorflow": "cnnrun.distributed.tensorflow",
    "keras:tensorflow": "cnnrun.distributed.tensorflow",
    "chainer": "cnnrun.distributed.chainer",
}
# Engine key → the launcher whose worlds it joins (who set the environment detect_world reads).
JOINS: Dict[str, str] = {
    "torch": TORCHRUN, "keras:torch": TORCHRUN, "tensorflow": TF_CONFIG, "keras:tensorflow": TF_CONFIG, "chainer": MPI,
}
# Engines that cannot synchronise batchnorm, and why (trainer.sync_batchnorm=true is refused before training).
NO_SYNC_BATCHNORM: Dict[str, str] = {
    "chainer": "framework=chainer cannot synchronise batchnorm: ChainerMN's MultiNodeBatchNormalization averages "
               "each rank's mean (wrong when shards differ in size) and takes the variance as E[x²] − E[x]², which "
               "cancels in float32; use trainer.sync_batchnorm=false (each rank's own statistics) or another "
               "framework",
}


class WorkersFailed(UserError):
    """A worker process of a multi-process run failed and the others were stopped (reported like a user error:
    one message, no traceback of the launcher's; the worker printed its own)."""

    exit_code = 1


def engine_key(framework: str, options: Mapping[str, Any]) -> str:
    """The engine a framework (with its options) trains on: Keras runs on its backend's engine."""
    if framework == "keras":
        return f"keras:{options.get('backend', 'tensorflow')}"
    return framework


def describe(key: str) -> str:
    """An engine key in the config's words: 'keras:torch' → 'framework=keras with framework.backend=torch'."""
    name, _, backend = key.partition(":")
    return f"framework={name}" + (f" with framework.backend={backend}" if backend else "")


def supported() -> str:
    return ", ".join(describe(key) for key in ENGINES)


def devices_problems(raw: Dict[str, Any]) -> List[Problem]:
    """Problems with ``trainer.devices`` / the world this process was started into, from the raw config."""
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    devices = trainer.get("devices", 1)
    framework = raw.get("framework") if isinstance(raw.get("framework"), dict) else {}
    name = framework.get("name")
    try:
        world = detect_world()
    except UserError as err:
        return [Problem("trainer.devices", str(err))]
    if not isinstance(devices, int) or not isinstance(name, str) or raw.get("task") != "train":
        return []  # a wrong type is the schema's problem; other tasks run in one process
    if devices == 1 and not world.started:
        return []
    key = engine_key(name, {k: v for k, v in framework.items() if k != "name"})
    if key not in ENGINES:
        what = f"trainer.devices={devices}" if devices > 1 else f"this process was started by {world.source}"
        return [Problem("trainer.devices", f"{describe(key)} cannot train on several "
                                           f"processes here ({what}); these can: {supported()}")]
    if world.started and world.source != JOINS[key]:
        return [Problem("trainer.devices", f"{describe(key)} joins worlds started by {JOINS[key]} (or "
                                           f"trainer.devices); this process was started by {world.source}")]
    if trainer.get("sync_batchnorm") is True and key in NO_SYNC_BATCHNORM:
        return [Problem("trainer.sync_batchnorm", f"true: {NO_SYNC_BATCHNORM[key]}")]
    if world.started and devices not in (1, world.local_size):
        return [Problem("trainer.devices", f"{devices}, but this process was started by {world.source} as one "
                                           f"of {world.local_size} on this machine; leave trainer.devices=1 "
                                           "under a launcher (it decides the number of processes)")]
    return []


def load_engine(key: str):
    return importlib.import_module(ENGINES[key])


def rank_device(device, world: World):
    """This rank's device: the GPU ``device.index + local_rank`` (one per local rank); on the CPU, the cores
    shared among the machine's ranks unless ``device.threads`` says how many each takes."""
    if world.size == 1:
        return device
    update: Dict[str, Any] = {}
    if device.kind in ("cuda", "auto"):
        update["name"] = device.kind
        update["index"] = device.cuda_index + world.local_rank
    if device.threads is None:
        update["threads"] = max(1, (os.cpu_count() or 1) // world.local_size)
    return device.model_copy(update=update)


__all__ = ["COLLECTIVE_TIMEOUT_S", "ENGINES", "SINGLE", "World", "WorkersFailed", "detect_world",
           "devices_problems", "engine_key", "load_engine", "rank_device"]
