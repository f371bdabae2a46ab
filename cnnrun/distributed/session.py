"""A rank's side: join the world this process belongs to, and make its runner data-parallel."""

from __future__ import annotations

from typing import Tuple

from cnnrun.distributed import engine_key, load_engine, rank_device
from cnnrun.distributed.collective import LOCAL
from cnnrun.distributed.runner import ShardedRunner
from cnnrun.distributed.world import detect_world
from cnnrun.errors import UserError


def join_world(cfg, train_size: int) -> Tuple[object, object]:
    """(the collective, this rank's device config): LOCAL and ``cfg.device`` for a single process."""
    world = detect_world()
    if not world.started:
        return LOCAL, cfg.device
    check_batches(train_size, cfg.trainer.batch_size, world.size)
    device = rank_device(cfg.device, world)
    engine = load_engine(engine_key(cfg.framework.name, cfg.framework.options()))
    return engine.join(world, device), device


def parallel_runner(runner, collective, cfg, num_classes: int):
    """``runner`` as one rank of a data-parallel world (a :class:`ShardedRunner`); itself in a single process."""
    if collective is LOCAL:
        return runner
    engine = load_engine(engine_key(cfg.framework.name, cfg.framework.options()))
    parallel = engine.wrap(runner, collective, cfg.trainer.sync_batchnorm)
    return ShardedRunner(runner, collective, parallel, num_classes)


def check_batches(train_size: int, batch_size: int, ranks: int) -> None:
    """Every training batch must give each rank at least one row (a rank with none has no loss to average)."""
    from cnnrun.data.pipeline import batch_bounds

    smallest = min((stop - start for start, stop in batch_bounds(train_size, batch_size)), default=0)
    if smallest < ranks:
        raise UserError(
            f"trainer.batch_size={batch_size} on {ranks} processes: the epoch's smallest batch holds {smallest} of "
            f"the {train_size} training images, fewer than one per process; use a batch size whose last batch "
            f"(training images modulo batch size) is 0 or at least {ranks}, or fewer processes"
        )
