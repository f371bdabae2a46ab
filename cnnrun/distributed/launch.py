"""The launching side: ``trainer.devices=N`` turns this command into N workers, and the workers' Hydra settings.

The command that launches has composed and checked its config (so a bad override fails once, before any worker
starts) and owns the run's output folder; its workers run the same command line in that folder, with
``trainer.resume=last`` resolved to the checkpoint it means now. Only rank 0 writes there. When a worker was
killed before it could end its MLflow run, the launcher ends it (FAILED, or KILLED after a signal): no run is left
RUNNING.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from cnnrun.distributed import WorkersFailed, engine_key, load_engine
from cnnrun.distributed.world import detect_world
from cnnrun.errors import TrainingInterrupted, UserError

LAUNCHER_PID = "CNNRUN_LAUNCHER_PID"  # set for the workers cnnrun launches: they exit when it does
# Overrides the launcher sets for its workers itself (the user's own values are replaced, not repeated).
WORKER_KEYS = ("hydra.run.dir", "hydra.output_subdir", "hydra/job_logging", "trainer.resume")


def launches(cfg) -> bool:
    """Whether this command starts workers (trainer.devices > 1, not already one of several processes)."""
    return cfg.task == "train" and cfg.trainer.devices > 1 and not detect_world().started


def run_workers(ctx, in_sweep: bool) -> float:
    """Start ``trainer.devices`` workers with the framework's engine and wait for them."""
    from cnnrun.progress import console
    from cnnrun.resume import LAST, find_last

    cfg = ctx.cfg
    if in_sweep:
        raise UserError(f"trainer.devices={cfg.trainer.devices} in a sweep (-m): each job would start its own "
                        "workers; sweep with trainer.devices=1, or train one configuration at a time")
    from cnnrun.distributed.session import check_batches
    from cnnrun.tasks.common import load_data

    # What only the data can tell, before any worker starts (each would fail alike); it also fills the data cache.
    check_batches(len(load_data(ctx).train), cfg.trainer.batch_size, cfg.trainer.devices)
    engine = load_engine(engine_key(cfg.framework.name, cfg.framework.options()))
    resume = cfg.trainer.resume
    if resume == LAST:
        resume = str(find_last(Path.cwd()))
    args = worker_args(sys.argv[1:], ctx.output_dir, resume)
    console.print(f"training on {cfg.trainer.devices} processes started by {engine.LAUNCHER}; "
                  f"rank 0 reports, in {ctx.output_dir}", highlight=False)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        engine.launch(cfg.trainer.devices, args)
    except TrainingInterrupted:
        end_open_runs(ctx, "KILLED", "interrupted: the launcher stopped every rank")
        raise
    except WorkersFailed as err:
        end_open_runs(ctx, "FAILED", str(err))
        raise
    finally:
        os.environ.pop(LAUNCHER_PID, None)
    return float("nan")  # the workers' result is in their MLflow run; sweeps do not launch


def worker_args(argv: Sequence[str], output_dir: Path, resume: Optional[str]) -> List[str]:
    """The launcher's command line for its workers: the same overrides, in the launcher's output folder."""
    kept = [arg for arg in argv if arg.split("=", 1)[0].lstrip("+~") not in WORKER_KEYS]
    extra = [f"hydra.run.dir={_quoted(str(output_dir))}", "hydra.output_subdir=null", "hydra/job_logging=none"]
    if resume:
        extra.append(f"trainer.resume={_quoted(resume)}")
    return kept + extra


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever it holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def end_open_runs(ctx, status: str, reason: str) -> None:
    """End the MLflow runs of this output folder that a killed worker left RUNNING."""
    tracking = ctx.cfg.tracking
    if not tracking.enabled:
        return
    from cnnrun.tracking import connect

    try:
        client = connect(tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is None:
            return
        folder = str(ctx.output_dir).replace("'", "\\'")
        runs = client.search_runs([experiment.experiment_id],
                                  f"tags.`cnnrun.output_dir` = '{folder}' and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_tag(run.info.run_id, "cnnrun.error", reason[:5000])
            client.set_terminated(run.info.run_id, status=status)
    except Exception as err:  # the workers' own outcome stands; say why it could not be completed
        print(f"cnnrun: warning: could not end the workers' MLflow run: {type(err).__name__}: {err}", file=sys.stderr)


def rank_hydra_args() -> List[str]:
    """Hydra overrides for a rank other than 0 that a launcher other than cnnrun started (torchrun, mpiexec): it
    writes nothing, so it gets no output folder, no .hydra/ and no log file of its own."""
    try:
        world = detect_world()
    except UserError:
        return []  # reported with the config's problems
    if not world.started or world.is_main or os.environ.get(LAUNCHER_PID):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none"]


def left_interrupted(exit_codes: Iterable[int]) -> bool:
    """Whether workers that ended with ``exit_codes`` stopped because a signal reached one of them (not the
    launcher): it left as an interrupted run does (exit 130), and the others did too, at the same step, or were
    being stopped (SIGTERM, SIGINT) after it."""
    codes = set(exit_codes)
    interrupted = TrainingInterrupted.exit_code
    return interrupted in codes and codes <= {interrupted, -signal.SIGTERM, -signal.SIGINT}


def die_with_launcher() -> None:
    """In a worker cnnrun launched: get SIGTERM when its parent dies, however it dies (Linux), so that no worker
    outlives the launcher. The parent is the launcher, or the mpiexec it started, which dies with it."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not die_with_parent():
        return
    try:
        os.kill(int(launcher), 0)
    except ProcessLookupError:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent() -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies; whether that could be arranged."""
    if not sys.platform.startswith("linux"):
        return False
    PR_SET_PDEATHSIG = 1
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    except (OSError, AttributeError):
        return False
