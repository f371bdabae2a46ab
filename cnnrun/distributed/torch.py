"""The PyTorch engine: torch's elastic launcher, a torch.distributed process group (NCCL on CUDA, gloo on the CPU)
and DistributedDataParallel, for framework=torch and for Keras on its torch backend (a Keras model on that
backend is a ``torch.nn.Module`` whose variables are ``torch.nn.Parameter``s, so DDP wraps it the same way).

Gradients: DDP averages them over ranks; a hook on the model's output multiplies the gradient reaching the logits by
the rank's :func:`~cnnrun.distributed.shard.loss_weight`, which is the same as weighting the rank's loss, without
touching the runner's train step. Weighting the loss (rather than each rank's gradients after the fact) is what
keeps synchronised batchnorm exact when shards differ in size: its backward pass sums every rank's contributions.

Synchronised batchnorm (``trainer.sync_batchnorm``): the batch mean and variance over every rank's rows, through
autograd-aware all-reduces (:func:`global_moments`), on any device: torch's own ``SyncBatchNorm`` is GPU-only.
"""

from __future__ import annotations

import inspect
import signal
import sys
import uuid
from datetime import timedelta
from typing import Any, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cnnrun.distributed import COLLECTIVE_TIMEOUT_S, WorkersFailed
from cnnrun.distributed.shard import loss_weight
from cnnrun.distributed.launch import left_interrupted
from cnnrun.distributed.world import TORCHRUN, World
from cnnrun.errors import TrainingInterrupted, UserError

LAUNCHER = "torch's elastic launcher (torch.distributed.launcher)"
# Seconds the launcher gives its workers to stop after passing on a signal or a failure, before SIGKILL: enough
# for the ranks to reach the next sync point, save once and end the MLflow run.
SHUTDOWN_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------------- launch


def launch(nprocs: int, args: Sequence[str]) -> None:
    """``python -m cnnrun *args`` in ``nprocs`` local workers under torch's elastic agent (no restarts), as
    ``torchrun --standalone --nproc-per-node=N`` would; wait for them."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()), role="cnnrun",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1", max_restarts=0,
        monitor_interval=0.2, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "cnnrun", *args)
    except SignalException as err:
        raise TrainingInterrupted(f"stopped by {err.sigval.name}: every rank was told to stop") from None
    except ChildFailedError as err:
        if left_interrupted(failure.exitcode for failure in err.failures.values()):
            raise TrainingInterrupted("the workers were stopped by a signal; rank 0 saved the state") from None
        raise WorkersFailed(_failures(err)) from None


def _failures(err) -> str:
    failed = sorted(err.failures.items())
    parts = []
    for rank, failure in failed:
        if failure.signal_name() != "<N/A>" and failure.exitcode < 0:
            parts.append(f"rank {rank} was killed by {failure.signal_name()}")
        else:
            parts.append(f"rank {rank} exited with code {failure.exitcode}")
    return "training failed: " + "; ".join(parts) + " (its messages are above); the other ranks were stopped"


# --------------------------------------------------------------------------------------------------- join


class TorchCollective:
    """Sums, gathers and broadcasts over the default process group (tensors on the rank's device for NCCL)."""

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(values, np.float64)).to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_gather(self, rows: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        longest = max(sizes)
        padded = np.zeros((longest, *rows.shape[1:]), rows.dtype)  # all_gather takes equal shapes
        padded[: len(rows)] = rows
        local = torch.from_numpy(padded).to(self.device)
        parts = [torch.empty_like(local) for _ in sizes]
        dist.all_gather(parts, local)
        return np.concatenate([part[:size].cpu().numpy() for part, size in zip(parts, sizes)])

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def close(self) -> None:
        """Leave the process group and stop its gloo worker threads, which happens only once nothing else holds the
        group: the caller drops its DDP-wrapped runner first. A worker thread that outlives this can release a
        collective's tensors while the interpreter finalises, and that aborts the process (SIGABRT, "terminate
        called without an active exception") after a successful run."""
        if dist.is_initialized():
            dist.destroy_process_group()


def join(world: World, device) -> TorchCollective:
    """Join the process group torchrun or the elastic launcher set up (``env://``), on this rank's device."""
    from cnnrun.backends.torch import resolve_device

    if world.source != TORCHRUN:
        raise UserError(f"framework=torch joins worlds started by torchrun (or trainer.devices); this process was "
                        f"started by {world.source}, which does not give torch.distributed its MASTER_ADDR/PORT")
    here = resolve_device(device)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    backend = "nccl" if here.type == "cuda" else "gloo"
    # DDP imports torch._dynamo; imported after the group exists, it keeps references to it for good, so that
    # close() could not stop the group's threads. Imported first, it never sees the group.
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=here if here.type == "cuda" else None)
    return TorchCollective(world, here)


# --------------------------------------------------------------------------------------------------- wrap


class WeightedLoss(nn.Module):
    """Calls ``module``; in training, scales the gradient that flows back into its output by ``weight``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.weight = 1.0

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if out.requires_grad and self.weight != 1.0:
            weight = self.weight
            out.register_hook(lambda grad: grad * weight)
        return out


def _differentiable_all_reduce():
    """torch.distributed.nn's sum all-reduce, whose backward pass all-reduces the gradients. Torch 2.13 marks it
    deprecated in favour of a private module whose all-reduce has no backward pass, so its warning is silenced."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                            category=FutureWarning)
    return all_reduce


def global_moments(x: torch.Tensor, dims: Sequence[int]):
    """(mean, biased variance, count) over ``dims`` of every rank's ``x``, kept as broadcastable shapes; gradients
    flow back to every rank's rows (``torch.distributed.nn`` all-reduces are differentiable)."""
    all_reduce = _differentiable_all_reduce()
    dims = list(dims)
    local = x.sum(dim=dims, keepdim=True)
    count = float(np.prod([x.shape[d] for d in dims]))
    total = all_reduce(torch.cat([local.reshape(-1), local.new_full((1,), count)]))
    n = total[-1].detach()
    mean = (total[:-1] / n).reshape(local.shape)
    squares = ((x - mean) ** 2).sum(dim=dims, keepdim=True)
    variance = (all_reduce(squares.reshape(-1)) / n).reshape(local.shape)
    return mean, variance, n


class SyncedBatchNorm(nn.Module):
    """A torch batchnorm (kept as a child: same parameters and buffers) normalising with the global batch's
    statistics in training; inference is the wrapped layer's own."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        if not self.training:
            return bn(x)
        dtype, x = x.dtype, x.float()  # under autocast (bf16/fp16): statistics in float32, as torch's batchnorm
        mean, variance, n = global_moments(x, [0, *range(2, x.dim())])
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            unbiased = variance * n / torch.clamp(n - 1, min=1)
            bn.running_mean.mul_(1 - bn.momentum).add_(mean.reshape(-1) * bn.momentum)
            bn.running_var.mul_(1 - bn.momentum).add_(unbiased.reshape(-1) * bn.momentum)
        shape = mean.shape
        scale = bn.weight.reshape(shape) * torch.rsqrt(variance + bn.eps)
        return ((x - mean) * scale + bn.bias.reshape(shape)).to(dtype)


def _sync_batchnorms(module: nn.Module) -> int:
    """Swap every batchnorm below ``module`` for a :class:`SyncedBatchNorm` around it; how many were swapped."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, SyncedBatchNorm(child))
            swapped += 1
        elif not isinstance(child, SyncedBatchNorm):
            swapped += _sync_batchnorms(child)
    return swapped


class TorchParallel:
    """What :func:`wrap` returns: the loss weight per step and rank 0's state shared before evaluating."""

    def __init__(self, collective: TorchCollective, weighted: WeightedLoss, state: List[torch.Tensor]):
        self.collective = collective
        self.weighted = weighted
        self.state = state  # tensors that are not trained: batchnorm running statistics

    def set_shard(self, size: int, total: int) -> None:
        self.weighted.weight = loss_weight(size, total, self.collective.world.size)

    @torch.no_grad()
    def share_state(self) -> None:
        for tensor in self.state:
            dist.broadcast(tensor, src=0)


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    # broadcast_buffers=False: no collective inside forward, so ranks may predict on their own; running statistics
    # are shared explicitly before evaluation (TorchParallel.share_state).
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})  # torch < 2.13 names it so
    return ddp(module, device_ids=ids, **no_sync)


def wrap(runner, collective: TorchCollective, sync_batchnorm: bool) -> TorchParallel:
    """DDP around a :class:`~cnnrun.backends.torch.TorchRunner`'s network or a Keras-on-torch runner's model."""
    from cnnrun.backends.torch import TorchRunner

    rank = collective.world.rank
    if rank:  # its own dropout masks, not rank 0's again on other rows (rank 0 keeps the checkpointed stream)
        torch.manual_seed(torch.initial_seed() + rank)
    if isinstance(runner, TorchRunner):
        if sync_batchnorm:
            _sync_batchnorms(runner.net)
        compiled = runner.forward is not runner.net
        weighted = WeightedLoss(_ddp(runner.net, runner.device))
        runner.forward = torch.compile(weighted) if compiled else weighted
        return TorchParallel(collective, weighted, [b for b in runner.net.buffers()])
    return _wrap_keras(runner, collective, sync_batchnorm)


def _wrap_keras(runner, collective: TorchCollective, sync_batchnorm: bool) -> TorchParallel:
    from cnnrun.backends import keras as keras_backend

    if sync_batchnorm:
        keras_backend.set_batch_moments(
            lambda x, axes: tuple(v.reshape(-1) if i < 2 else v for i, v in enumerate(global_moments(x, axes)))
        )
    weighted = WeightedLoss(_ddp(runner.keras_model, runner.device))
    runner.keras_model = weighted
    state = [var.value for var in runner.tensors.values() if not var.trainable]
    return TorchParallel(collective, weighted, state)


__all__ = ["LAUNCHER", "join", "launch", "wrap", "global_moments", "SyncedBatchNorm"]
