"""The Hydra callback behind every ``cnnrun -m`` sweep (registered in conf/config.yaml as hydra.callbacks.sweep).

- ``on_multirun_start`` (main process, before any job): opens the MLflow parent run once and writes its id to
  the sweep directory, where every job (in any process) finds it.
- ``on_job_start`` (in the job's process, which may be on another machine): hands the job the sweep's state
  (the parent run id) that came with this callback, pickled by the launcher.
- ``on_job_end`` (in the job's process): writes the job's record (status, objective, run, error); a job that
  failed before it opened a run gets a FAILED child run.
- ``on_multirun_end`` (main process): ranks the jobs, prints the table, writes sweep_summary.csv/.md and records
  the best job on the parent run.

When Hydra stops a sweep itself (its basic sweeper raises once a batch with a failed job has run, Optuna past
``max_failure_rate``, Ctrl-C), ``on_multirun_end`` is not called: ``cnnrun.cli`` calls :func:`finish_active`
instead, so the summary is still written. In a single run every method does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from cnnrun.errors import TrainingInterrupted, UserError
from cnnrun.sweep import job as sweep_job
from cnnrun.sweep import state as sweep_state

_active: Optional["SweepCallback"] = None
PLAIN = dict(highlight=False, markup=False, soft_wrap=True)  # one line each, greppable in a log


def finish_active(status: str) -> None:
    """End the sweep this process started, if Hydra did not get to ``on_multirun_end`` (FAILED or KILLED)."""
    if _active is not None:
        _active.finish(status)


def _is_multirun(config) -> bool:
    from hydra.types import RunMode

    try:
        return config.hydra.mode == RunMode.MULTIRUN
    except Exception:
        return False


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.sweep_dir: Optional[Path] = None
        self.state: Optional[sweep_state.SweepState] = None
        self.finished = False

    # --- the main process -------------------------------------------------------------------------------------
    def on_multirun_start(self, config, **kwargs: Any) -> None:
        global _active
        from cnnrun.progress import console
        from cnnrun.sweep.launchers import check_tracking
        from cnnrun.sweep.parent import open_parent

        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            check_tracking(config)  # jobs on other machines cannot write to a local store: refuse before any job
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            sweep_state.clear_records(self.sweep_dir)
            self.state = open_parent(config, self.sweep_dir)
        except UserError as err:  # e.g. the tracking server is down: stop before any job (Hydra would go on)
            print(err.render(), file=sys.stderr)
            sys.exit(err.exit_code)
        sweep_state.write_state(self.sweep_dir, self.state)
        self.finished = False
        _active = self
        if self.state.parent_run_id:
            console.print(
                f"sweep: parent run {self.state.parent_run_id} in experiment '{self.state.experiment}' "
                f"({self.state.tracking_uri}); jobs write to {self.sweep_dir}",
                **PLAIN,
            )

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        self.finish("FINISHED")

    def finish(self, status: str) -> None:
        """Summarise the jobs, print the table, close the parent run. Once per sweep."""
        global _active
        if self.finished or self.state is None or self.sweep_dir is None:
            return
        self.finished = True
        _active = None
        from cnnrun.progress import console
        from cnnrun.sweep.parent import close_parent, ui_hint
        from cnnrun.sweep.summary import build

        summary = build(self.state, sweep_state.read_records(self.sweep_dir), self.sweep_dir)
        files = summary.write_files()
        warning = close_parent(self.state, summary, status, files)
        if not console.is_terminal:  # a log file or a pipe: wide lines rather than rich's 80-column wrapping
            from rich.console import Console

            console = Console(stderr=True, width=max(console.width, 160))
        console.print(summary.table())
        for line in summary.errors():
            console.print(line, style="red", **PLAIN)
        best = summary.best()
        if best is not None:
            console.print(
                f"best: job {best.num} ({summary.varying(best)}) {self.state.objective}={best.objective:.4f}"
                + (f", run {best.run_id}" if best.run_id else ""),
                **PLAIN,
            )
        where = f"; parent run {self.state.parent_run_id}" if self.state.parent_run_id else ""
        console.print(f"sweep {summary.outcome(status)}; summary in {files[0]}{where}", **PLAIN)
        hint = ui_hint(self.state)
        if hint:
            console.print(f"MLflow UI: {hint}", **PLAIN)
        if warning:
            print(f"cnnrun: warning: {warning}", file=sys.stderr)

    # --- each job's process ------------------------------------------------------------------------------------
    def on_job_start(self, config, **kwargs: Any) -> None:
        if _is_multirun(config):
            sweep_job.begin(None)  # cnnrun.cli sets the job up; nothing left over from the previous job
            # This callback reached the job's process with the launcher (pickled by joblib, submitit or Ray),
            # carrying the parent run opened in the main process: the job needs no shared sweep folder to find it.
            sweep_job.know_state(self.state)

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        try:
            self._record(config, job_return)
        except Exception as err:  # a record that cannot be written must not fail the job or the sweep
            print(f"cnnrun: warning: sweep job record not written: {err}", file=sys.stderr)
        finally:
            sweep_job.begin(None)

    def _record(self, config, job_return) -> None:
        from hydra.core.utils import JobStatus

        job = sweep_job.current() or sweep_job.from_hydra()
        if job is None:
            return
        objective, error, run_id = None, None, job.run_id
        if job_return.status == JobStatus.COMPLETED:
            status = "SKIPPED" if job.skipped_from else "FINISHED"
            run_id = job.skipped_from or run_id
            value = job_return._return_value
            objective = float(value) if isinstance(value, (int, float)) else None
        else:
            err = job_return._return_value
            status = "KILLED" if isinstance(err, TrainingInterrupted) else "FAILED"
            error = str(err) if isinstance(err, (UserError, TrainingInterrupted)) else f"{type(err).__name__}: {err}"
            if run_id is None and job.state is not None:
                from cnnrun.sweep.parent import failed_child

                run_id = failed_child(job.state, job, config.tracking, job.output_dir.name, error)
        record = sweep_state.JobRecord(
            num=job.num,
            overrides=job.overrides,
            status=status,
            objective=objective,
            run_id=run_id,
            error=error,
            output_dir=str(job.output_dir),
            metrics=dict(job.metrics),
        )
        sweep_state.write_record(job.sweep_dir, record)
