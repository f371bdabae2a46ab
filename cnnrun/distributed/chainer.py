"""The Chainer engine: ChainerMN (shipped with Chainer 7) over MPI through mpi4py, launched with ``mpiexec``.

``trainer.devices=N`` runs ``mpiexec -n N python -m cnnrun ...``; a command that mpiexec (or srun with PMI)
started joins the world MPI describes. Gradients are averaged over ranks by the communicator
(``multi_node_mean_grad``) between backward and the update, after each rank weighted its loss by its share of
the global batch, so the average is the global batch's mean-loss gradient (gradient clipping sees that one).

Needs the ``mpi`` extra (mpi4py) and an MPI library with its ``mpiexec``: Open MPI (Debian: ``openmpi-bin``),
whose ``libmpi.so.40`` the mpi4py wheel loads. Synchronised batchnorm is refused before training (its
``Parallel.sync_batchnorm_refusal`` in :data:`cnnrun.backends.BACKENDS`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

from cnnrun.distributed import WorkersFailed
from cnnrun.distributed.local_workers import run_workers
from cnnrun.distributed.shard import loss_weight
from cnnrun.distributed.world import World
from cnnrun.errors import TrainingInterrupted, UserError

LAUNCHER = "mpiexec (ChainerMN)"
MPI_HINT = ("install the mpi extra (`pip install 'cnnrun[mpi]'`, mpi4py) and Open MPI "
            "(Debian/Ubuntu: `apt-get install openmpi-bin`)")


def mpiexec_command(nprocs: int) -> list:
    """``mpiexec -n N`` with the flags Open MPI needs on one machine: more ranks than cores is allowed, and so is
    running as root (containers, CI)."""
    if importlib.util.find_spec("mpi4py") is None:
        raise UserError(f"trainer.devices={nprocs} with framework=chainer needs mpi4py, which is not installed; "
                        f"{MPI_HINT}")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise UserError(f"trainer.devices={nprocs} with framework=chainer starts its ranks with mpiexec, which is "
                        f"not on PATH; {MPI_HINT}")
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    command = [mpiexec, "-n", str(nprocs)]
    if "Open MPI" in version or "OpenRTE" in version:
        command.append("--oversubscribe")
        if os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command


def launch(nprocs: int, args: Sequence[str]) -> None:
    """``mpiexec -n N python -m cnnrun *args``; mpiexec passes Ctrl-C/SIGTERM on to the ranks and stops them all
    when one fails."""
    outcome = run_workers([*mpiexec_command(nprocs), sys.executable, "-m", "cnnrun", *args], [dict(os.environ)])
    if outcome.signal is not None:
        raise TrainingInterrupted(f"stopped by {outcome.signal}: every rank was told to stop")
    if outcome.interrupted:
        raise TrainingInterrupted("the ranks were stopped by a signal; rank 0 saved the state")
    if outcome.failures:
        raise WorkersFailed(f"training failed: mpiexec exited with code {outcome.failures[0]} (the failing rank's "
                            "messages are above); the other ranks were stopped")


class MpiCollective:
    """Sums, gathers and broadcasts over MPI_COMM_WORLD (mpi4py)."""

    def __init__(self, world: World, communicator):
        self.world = world
        self.communicator = communicator  # ChainerMN's, for the gradients
        self.mpi = communicator.mpi_comm

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        local = np.array(values, np.float64)
        total = np.empty_like(local)
        self.mpi.Allreduce(local, total)
        return total

    def all_gather(self, rows: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        return np.concatenate(self.mpi.allgather(np.ascontiguousarray(rows)))

    def broadcast(self, value: Any) -> Any:
        return self.mpi.bcast(value, root=0)

    def close(self) -> None:
        pass  # mpi4py finalises MPI when the process exits


def join(world: World, device) -> MpiCollective:
    from cnnrun.backends.chainer_env import import_chainer

    import_chainer()  # chainermn imports chainer: through cnnrun's import fixes
    try:
        import chainermn
        import mpi4py.MPI  # noqa: F401  (loads the MPI library now, to say clearly when there is none)
    except (ImportError, RuntimeError) as err:
        raise UserError(f"framework=chainer on several processes needs mpi4py and an MPI library ({err}); "
                        f"{MPI_HINT}") from None
    on_gpu = device.kind == "cuda"
    communicator = chainermn.create_communicator("pure_nccl" if on_gpu else "naive")
    return MpiCollective(world, communicator)


class ChainerParallel:
    """What :func:`wrap` returns: the global batch's size per step, and rank 0's running statistics shared."""

    def __init__(self, runner, collective: MpiCollective):
        self.runner = runner
        self.collective = collective

    def set_shard(self, size: int, total: int) -> None:
        self.runner.loss_weight = loss_weight(size, total, self.collective.world.size)

    def share_state(self) -> None:
        names = [name for name in self.runner.net.tensors if self.runner.net.param(name) is None]  # running stats
        values = self.collective.broadcast({name: np.asarray(self.runner.net.array(name)) for name in names})
        for name, value in values.items():
            self.runner.net.array(name)[...] = self.runner.xp.asarray(value)


def wrap(runner, collective: MpiCollective, sync_batchnorm: bool) -> ChainerParallel:
    """Average a Chainer runner's gradients over ranks (sync_batchnorm is refused earlier: its sync_batchnorm_refusal)."""
    runner.communicator = collective.communicator
    return ChainerParallel(runner, collective)


__all__ = ["LAUNCHER", "join", "launch", "wrap"]
