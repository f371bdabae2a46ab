"""What a running sweep job knows about its sweep: its number, its overrides, its parent run.

:func:`from_hydra` builds it in the job's own process (the main process, a joblib worker, a submitit or Ray job
on another machine) from Hydra's job config and the sweep's state (brought by the callback, else the sweep
directory's state file); ``cnnrun.cli`` makes it :func:`current` for the task it runs.
:func:`cnnrun.tracking.start_run` then nests the job's MLflow run under the sweep's parent run and tags it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cnnrun.sweep.state import SweepState, read_state

JOB_TAG = "cnnrun.sweep.job"
DIR_TAG = "cnnrun.sweep.dir"


@dataclass
class SweepJob:
    num: int
    overrides: List[str]
    sweep_dir: Path
    output_dir: Path
    state: Optional[SweepState] = None
    parallel: int = 1  # jobs that run at the same time (joblib's n_jobs), 1 for Hydra's basic launcher
    run_id: Optional[str] = None  # the MLflow run this job opened
    skipped_from: Optional[str] = None  # the FINISHED run whose result this job reused
    metrics: Dict[str, float] = field(default_factory=dict)  # the run's latest metric values, for its record

    def parent_for(self, tracking) -> Optional[str]:
        """The parent run id, when this job tracks into the store and experiment the parent run is in."""
        state = self.state
        if state is None or not state.parent_run_id:
            return None
        if tracking.uri != state.tracking_uri or tracking.experiment != state.experiment:
            return None
        return state.parent_run_id

    def tags(self) -> Dict[str, str]:
        return {
            JOB_TAG: str(self.num),
            DIR_TAG: str(self.sweep_dir),
            "cnnrun.sweep.job_overrides": " ".join(self.overrides),
        }

    def run_name(self, base: str) -> str:
        """Children are told apart by job number, like their output folders (``3-classic_cnn-torch``)."""
        return f"{self.num}-{base}"


_current: Optional[SweepJob] = None
_known_state: Optional[SweepState] = None  # the sweep's state as the callback brought it to this process


def current() -> Optional[SweepJob]:
    """The sweep job this process is running now; None in a single run."""
    return _current


def begin(job: Optional[SweepJob]) -> None:
    global _current
    _current = job


def know_state(state: Optional[SweepState]) -> None:
    global _known_state
    _known_state = state


def note_run(run_id: str) -> None:
    """Called by tracking.start_run: the run the current job opened (its on_job_end record points at it)."""
    if _current is not None:
        _current.run_id = run_id


def from_hydra() -> Optional[SweepJob]:
    """The current Hydra job as a sweep job, or None when Hydra is not in multirun mode."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(str(hc.sweep.dir)).resolve()
    return SweepJob(
        num=int(hc.job.num),
        overrides=list(hc.overrides.task),
        sweep_dir=sweep_dir,
        output_dir=Path(str(hc.runtime.output_dir)),
        state=_known_state or read_state(sweep_dir),
        parallel=parallel_jobs(hc.launcher),
    )


def parallel_jobs(launcher) -> int:
    """How many jobs the launcher runs at once: joblib's n_jobs (-1 = one per core), else 1."""
    target = str(launcher.get("_target_", ""))
    if "joblib" not in target.lower():
        return 1
    n_jobs = launcher.get("n_jobs")
    cores = os.cpu_count() or 1
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:  # joblib: -1 is all cores, -2 all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    return max(1, n_jobs)
