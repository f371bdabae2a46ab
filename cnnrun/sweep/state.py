"""The sweep directory's own files: how the parent run id reaches jobs in other processes (joblib workers).

``<sweep dir>/.cnnrun/sweep.json`` is written once by the callback before any job starts; each job writes
``<sweep dir>/.cnnrun/jobs/<num>.json`` when it ends. Every write is atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from cnnrun.sweep.objective import DEFAULT_OBJECTIVE

STATE_DIR = ".cnnrun"


@dataclass
class SweepState:
    parent_run_id: Optional[str]  # None: tracking is off for this sweep
    tracking_uri: str
    experiment: str
    objective: str = DEFAULT_OBJECTIVE
    direction: str = "maximize"
    sweeper: str = "basic"
    launcher: str = "basic"
    experiment_id: Optional[str] = None


@dataclass
class JobRecord:
    num: int
    overrides: List[str]
    status: str  # FINISHED | FAILED | KILLED | SKIPPED
    objective: Optional[float] = None
    run_id: Optional[str] = None  # the job's run, or for SKIPPED the FINISHED run it reused
    error: Optional[str] = None
    output_dir: Optional[str] = None
    metrics: dict = field(default_factory=dict)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def state_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_DIR / "sweep.json"


def jobs_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / STATE_DIR / "jobs"


def write_state(sweep_dir: Path, state: SweepState) -> None:
    _write_json(state_path(sweep_dir), asdict(state))


def read_state(sweep_dir: Path) -> Optional[SweepState]:
    try:
        data = json.loads(state_path(sweep_dir).read_text())
    except (OSError, ValueError):
        return None
    known = SweepState.__dataclass_fields__
    return SweepState(**{k: v for k, v in data.items() if k in known})


def write_record(sweep_dir: Path, record: JobRecord) -> None:
    _write_json(jobs_dir(sweep_dir) / f"{record.num:05d}.json", asdict(record))


def read_records(sweep_dir: Path) -> List[JobRecord]:
    records = []
    for path in sorted(jobs_dir(sweep_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        known = JobRecord.__dataclass_fields__
        records.append(JobRecord(**{k: v for k, v in data.items() if k in known}))
    return sorted(records, key=lambda r: r.num)


def clear_records(sweep_dir: Path) -> None:
    """A new invocation in the same sweep directory starts a fresh list of jobs."""
    for path in jobs_dir(sweep_dir).glob("*.json"):
        path.unlink(missing_ok=True)
