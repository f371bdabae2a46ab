"""Resumable sweeps: a job whose resolved config already has a FINISHED run in the experiment is skipped.

Re-running an interrupted sweep's command finishes it: finished jobs return their recorded objective at once,
the rest train. ``sweep.rerun=true`` trains every job again. Configs match by ``cnnrun.config_hash`` (see
:meth:`cnnrun.context.RunContext.config_hash` for what it leaves out).
"""

from __future__ import annotations

from typing import Optional

from cnnrun.sweep import job as sweep_job

HASH_TAG = "cnnrun.config_hash"


def skip_finished(ctx, task: str = "train") -> Optional[float]:
    """In a sweep: the objective of a FINISHED run with this config (and say so), else None (train it)."""
    job = sweep_job.current()
    cfg = ctx.cfg
    if job is None or cfg.sweep.rerun or not cfg.tracking.enabled:
        return None
    run = find_finished(cfg.tracking.uri, cfg.tracking.experiment, ctx.config_hash(), task, cfg.sweep.objective)
    if run is None:
        return None
    from cnnrun.progress import console

    value = run.data.metrics[cfg.sweep.objective]
    job.skipped_from = run.info.run_id
    console.print(
        f"skipped: job {job.num} ({' '.join(job.overrides) or 'no overrides'}) already FINISHED as run "
        f"{run.info.run_id} ({run.info.run_name}) with {cfg.sweep.objective}={value:.4f}; "
        "sweep.rerun=true trains it again",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    return float(value)


def find_finished(uri: str, experiment: str, config_hash: str, task: str, objective: str):
    """The newest FINISHED run of ``task`` with this config hash that logged ``objective``, or None.

    A store that cannot be read answers None: the run start that follows reports the problem clearly.
    """
    from mlflow.exceptions import MlflowException
    from cnnrun.tracking import connect

    try:
        client = connect(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=(
                f"tags.`{HASH_TAG}` = '{config_hash}' and tags.`cnnrun.task` = '{task}' "
                "and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
    except (MlflowException, OSError):
        return None
    return next((r for r in runs if objective in r.data.metrics), None)
