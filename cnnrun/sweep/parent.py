"""The sweep's parent MLflow run: opened once before any job starts, closed with the summary at the end.

Opening it in the callback, in the main process, also creates the experiment (and a fresh sqlite store's
schema) before parallel jobs start, so jobs never race to create them ("database is locked").

Re-running the same sweep command continues the same parent run (found by ``cnnrun.sweep.signature``: the
command's overrides and the sweeper's search space), so the UI shows one parent with every job under it;
``sweep.rerun=true`` opens a new one.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Dict, Optional

from cnnrun.errors import UserError
from cnnrun.sweep.state import SweepState

SIGNATURE_TAG = "cnnrun.sweep.signature"
TASK_TAG = "cnnrun.task"
SWEEP_TASK = "sweep"
# Sweeper settings that say how much or how fast to search, not what: changing them continues the same sweep.
NOT_IN_SIGNATURE = ("n_trials", "n_jobs", "max_batch_size", "max_failure_rate", "storage")


def plugin_name(target: str) -> str:
    """hydra_plugins....OptunaSweeper → optuna; ...BasicLauncher → basic; ...JoblibLauncher → joblib."""
    cls = str(target).rsplit(".", 1)[-1]
    return re.sub(r"(Sweeper|Launcher)$", "", cls).lower() or str(target)


def sweep_name(sweep_dir: Path) -> str:
    """multirun/2024-05-01/12-30-00 → sweep-2024-05-01-12-30-00; multirun/study1 → sweep-study1."""
    parts = Path(sweep_dir).parts
    if len(parts) >= 2 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", parts[-2]):
        return f"sweep-{parts[-2]}-{parts[-1]}"
    return f"sweep-{parts[-1]}"


def signature(config) -> str:
    """What identifies a sweep: the config it starts from, its command-line overrides, its sweeper's space."""
    from omegaconf import OmegaConf

    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    sweeper = {k: v for k, v in sweeper.items() if k not in NOT_IN_SIGNATURE}
    data = {
        "config": str(config.hydra.job.config_name),
        "overrides": sorted(str(o) for o in config.hydra.overrides.task),
        "sweeper": sweeper,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_parent(config, sweep_dir: Path) -> SweepState:
    """Create (or continue) the parent run; a store that cannot be used stops the sweep before any job runs."""
    tracking = config.tracking
    state = SweepState(
        parent_run_id=None,
        tracking_uri=str(tracking.uri),
        experiment=str(tracking.experiment),
        objective=str(config.sweep.objective),
        direction=str(config.sweep.direction),
        sweeper=plugin_name(config.hydra.sweeper._target_),
        launcher=plugin_name(config.hydra.launcher._target_),
    )
    if not tracking.enabled:
        return state
    from mlflow.exceptions import MlflowException

    from cnnrun.tracking import connect, ensure_experiment

    client = connect(state.tracking_uri)
    sig = signature(config)
    tags = {
        TASK_TAG: SWEEP_TASK,
        SIGNATURE_TAG: sig,
        "cnnrun.sweep.dir": str(sweep_dir),
        "cnnrun.sweep.overrides": " ".join(str(o) for o in config.hydra.overrides.task),
        "cnnrun.sweep.sweeper": state.sweeper,
        "cnnrun.sweep.launcher": state.launcher,
        "cnnrun.sweep.objective": state.objective,
        "cnnrun.sweep.direction": state.direction,
        "cnnrun.sweep.status": "running",
    }
    try:
        experiment_id = ensure_experiment(client, state.experiment)
        previous = None if config.sweep.rerun else _previous_parent(client, experiment_id, sig)
        state.experiment_id = experiment_id
        if previous is not None:
            state.parent_run_id = previous.info.run_id
            client.update_run(previous.info.run_id, status="RUNNING")
            _set_tags(client, previous.info.run_id, tags)
        else:
            run = client.create_run(experiment_id, run_name=sweep_name(sweep_dir), tags=tags)
            state.parent_run_id = run.info.run_id
            _log_params(client, run.info.run_id, search_space(config))
    except (MlflowException, OSError) as err:
        raise UserError(
            f"tracking.uri={state.tracking_uri} cannot be used: {str(err).splitlines()[0][:300]}\n"
            "  start the tracking server, fix the URI, or run with tracking.enabled=false"
        ) from None
    return state


def _previous_parent(client, experiment_id: str, sig: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SIGNATURE_TAG}` = '{sig}' and tags.`{TASK_TAG}` = '{SWEEP_TASK}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def search_space(config) -> Dict[str, str]:
    """The parent run's params: what the sweep varies, as written (optimizer.lr: '1e-3,3e-3' or 'interval(...)')."""
    from omegaconf import OmegaConf

    space = {str(k): str(v) for k, v in (OmegaConf.to_container(config.hydra.sweeper, resolve=False)
                                         .get("params") or {}).items()}
    for override in config.hydra.overrides.task:
        key, _, value = str(override).partition("=")
        space[key.lstrip("+~")] = value
    return space


def _log_params(client, run_id: str, params: Dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def _set_tags(client, run_id: str, tags: Dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def close_parent(state: SweepState, summary, status: str, files=()) -> Optional[str]:
    """Record the summary on the parent run and end it; returns a warning instead of raising."""
    if not state.parent_run_id:
        return None
    from mlflow.entities import Metric, RunTag

    from cnnrun.tracking import connect

    try:
        client = connect(state.tracking_uri)
        now = int(time.time() * 1000)
        metrics = {f"jobs_{k}": float(v) for k, v in summary.counts().items()}
        tags = {"cnnrun.sweep.status": summary.outcome(status), "mlflow.note.content": summary.markdown()}
        best = summary.best()
        if best is not None:
            metrics[state.objective] = float(best.objective)
            tags.update({
                "cnnrun.sweep.best_run_id": best.run_id or "",
                "cnnrun.sweep.best_job": str(best.num),
                "cnnrun.sweep.best_overrides": " ".join(best.overrides),
            })
        client.log_batch(
            state.parent_run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()],
        )
        for path in files:
            client.log_artifact(state.parent_run_id, str(path))
        client.set_terminated(state.parent_run_id, status=status)
    except Exception as err:  # the jobs' runs are recorded already: a summary that cannot be written only warns
        return f"the sweep's parent run {state.parent_run_id} could not be updated: {str(err).splitlines()[0][:300]}"
    return None


def failed_child(state: SweepState, job, tracking, name: str, error: str) -> Optional[str]:
    """A job that failed before it opened a run (a config error) still gets a FAILED child run, for the UI."""
    parent = job.parent_for(tracking)
    if not parent or not tracking.enabled:
        return None
    from cnnrun.tracking import connect

    try:
        client = connect(state.tracking_uri)
        experiment = client.get_experiment_by_name(state.experiment)
        tags = {
            **job.tags(),
            "mlflow.parentRunId": parent,
            TASK_TAG: "train",
            "cnnrun.overrides": " ".join(job.overrides),
            "cnnrun.output_dir": str(job.output_dir),
            "cnnrun.error": error[:5000],
        }
        run = client.create_run(experiment.experiment_id, run_name=name, tags=tags)
        client.set_terminated(run.info.run_id, status="FAILED")
        return run.info.run_id
    except Exception:  # the job's own error is what matters; the summary still lists it
        return None


def ui_hint(state: SweepState) -> Optional[str]:
    """Where to look at the sweep in the MLflow UI (3.17 needs ?workflowType=machine_learning for the runs table)."""
    if not state.parent_run_id or not state.experiment_id:
        return None
    page = f"#/experiments/{state.experiment_id}/runs/{state.parent_run_id}?workflowType=machine_learning"
    if state.tracking_uri.startswith(("http://", "https://")):
        return f"{state.tracking_uri.rstrip('/')}/{page}"
    return f"run `mlflow ui --backend-store-uri {state.tracking_uri}` here, then open http://127.0.0.1:5000/{page}"
