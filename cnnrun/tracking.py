"""Experiment tracking behind a small protocol; MLflow is the implementation cnnrun ships.

The trainer talks to a :class:`MetricLogger` only. :class:`MlflowLogger` batches metrics (one REST call or one
transaction per epoch, not one per value) and always ends its run: FINISHED, FAILED with the error as a tag,
or KILLED on interruption. When the store stops answering mid-run it warns once and goes on logging to files in
the run's output folder (:mod:`cnnrun.tracking_offline`), so training finishes and nothing is lost. In a sweep,
:func:`start_run` nests the run under the sweep's parent run (:mod:`cnnrun.sweep.job`).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Protocol

from cnnrun.errors import UserError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens experiments in its GenAI view without it
# MLflow retries an unreachable http:// server for about four minutes by default; cnnrun gives up after ~10 s
# (at the start: a clear error; mid-run: the offline log). Set these variables yourself to choose otherwise.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
OFFLINE_FOLDER = "tracking_offline"


def connect(uri: str):
    """An MlflowClient for ``uri`` (any tracking URI: a path, sqlite:///, postgresql://, http://host:port)."""
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    return _initialise_sqlite_store(uri, uri[len("sqlite:///") :])


def _initialise_sqlite_store(uri: str, db_path: str):
    """Create/migrate a local sqlite store under an exclusive file lock.

    MLflow creates and migrates the schema on first use; several cnnrun processes starting on a fresh store at
    once (parallel runs, joblib sweeps) otherwise race and fail with "table already exists" or "database is
    locked". The first process migrates while the others wait; after that sqlite's own locking suffices.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    lock_path = f"{db_path}.cnnrun-lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # forces the store (and its migrations) into being
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def _tracking_errors():
    """What a tracking call raises when the store is gone: MLflow wraps most of it; requests/OSError the rest."""
    from mlflow.exceptions import MlflowException

    errors = [MlflowException, OSError]
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:  # pragma: no cover - MLflow depends on requests
        pass
    return tuple(errors)


class MetricLogger(Protocol):
    run_id: Optional[str]

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...

    def log_artifact(self, path: os.PathLike, artifact_path: Optional[str] = None) -> None: ...

    def log_dataset(self, dataset) -> None: ...

    def log_model(self, checkpoint: os.PathLike) -> None: ...

    def end(self, status: str, error: Optional[str] = None) -> None: ...


class NullLogger:
    """tracking.enabled=false: the trainer runs the same, nothing is recorded."""

    run_id = None

    def __init__(self):
        self.latest: Dict[str, float] = {}  # each metric's last value (a sweep job's objective comes from here)

    def log_params(self, params): ...

    def set_tags(self, tags): ...

    def log_metrics(self, metrics, step=None):
        self.latest.update({k: float(v) for k, v in metrics.items()})

    def log_model(self, checkpoint): ...

    def log_artifact(self, path, artifact_path=None): ...

    def log_dataset(self, dataset): ...

    def end(self, status, error=None): ...


class MlflowLogger:
    """One MLflow run. Created by :func:`start_run`, which checks that the store answers before training."""

    def __init__(self, client, run_id: str, uri: str = "", offline_dir: Optional[Path] = None, log_model: bool = True,
                 register_model: Optional[str] = None):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.offline_dir = Path(offline_dir) if offline_dir else Path.cwd() / OFFLINE_FOLDER / run_id
        self.should_log_model = log_model
        self.register_model = register_model  # a model registry name, or None
        self.latest: Dict[str, float] = {}  # each metric's last value (a sweep job's objective comes from here)
        self.offline = None  # an OfflineLog once the store stopped answering
        self._ended = False

    def _call(self, what: str, online, offline) -> None:
        """Run ``online()`` against the store; on its first failure warn once and use ``offline(log)`` from then on."""
        if self.offline is None:
            try:
                online()
                return
            except _tracking_errors() as err:
                self._go_offline(what, err)
        offline(self.offline)

    def _go_offline(self, what: str, err: BaseException) -> None:
        from cnnrun.tracking_offline import OfflineLog

        reason = f"{what} failed: {str(err).splitlines()[0][:300]}"
        self.offline = OfflineLog(self.offline_dir, self.run_id, self.uri, reason)
        print(
            f"cnnrun: warning: MLflow tracking at {self.uri} stopped working ({reason}); training goes on and "
            f"this run's tracking continues in {self.offline_dir}",
            file=sys.stderr,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]

        def online():
            for start in range(0, len(items), 100):  # MLflow's per-batch param limit
                self.client.log_batch(self.run_id, params=items[start : start + 100])

        self._call("logging params", online, lambda log: log.params(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._call("setting tags", lambda: self.client.log_batch(self.run_id, tags=batch), lambda log: log.tags(tags))

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        self.latest.update({k: float(v) for k, v in metrics.items()})
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._call("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=batch),
                   lambda log: log.metrics(metrics, step))

    def log_artifact(self, path: os.PathLike, artifact_path: Optional[str] = None) -> None:
        self._call(
            f"uploading {Path(path).name}",
            lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
            lambda log: log.artifact(path, artifact_path),
        )

    def log_model(self, checkpoint: os.PathLike) -> None:
        """The checkpoint as an MLflow pyfunc model (tracking.log_model), so mlflow.pyfunc.load_model predicts;
        registered as tracking.register_model when that names it."""
        if not self.should_log_model or self.offline is not None:
            return
        from cnnrun.mlflow_model import log_pyfunc

        try:
            log_pyfunc(self.run_id, Path(checkpoint), register_as=self.register_model)
        except _tracking_errors() as err:
            self._go_offline("logging the model", err)
        except Exception as err:  # the run's results are recorded; a model that cannot be packaged only warns
            print(f"cnnrun: warning: the MLflow model was not logged: {type(err).__name__}: {err}", file=sys.stderr)

    def log_dataset(self, dataset) -> None:
        self._call("logging the dataset", lambda: self._log_dataset(dataset), lambda log: None)

    def _log_dataset(self, dataset) -> None:
        """Record the dataset with MLflow's dataset tracking: name, digest, source, split sizes."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.entities import Dataset as MlflowDataset
        import json

        profile = json.dumps({"splits": dataset.split_sizes(), "classes": dataset.num_classes})
        schema = json.dumps({"images": ["uint8", list(dataset.train.images.shape[1:])], "labels": "int64"})
        for context in ("training", "validation", "test"):
            entity = MlflowDataset(
                name=dataset.name,
                digest=dataset.digest(),
                source_type="local" if os.path.exists(str(dataset.source)) else "code",
                source=json.dumps({"source": str(dataset.source)}),
                schema=schema,
                profile=profile,
            )
            self.client.log_inputs(
                self.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
            )

    def end(self, status: str, error: Optional[str] = None) -> None:
        if self._ended:
            return
        self._ended = True
        if error:
            self.set_tags({"cnnrun.error": error})
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status=status),
                   lambda log: log.end(status, error))
        if self.offline is not None:
            print(
                f"cnnrun: MLflow run {self.run_id} at {self.uri} could not be completed: it ended {status} here, "
                f"but the store stopped answering. Its metrics, params and tags since then are in "
                f"{self.offline_dir} (metrics.jsonl, params.json, tags.json, status.json); the checkpoint and the "
                f"other outputs are in {self.offline_dir.parent}",
                file=sys.stderr,
            )


def start_run(
    cfg, run_name: str, tags: Dict[str, str], parent_run_id: Optional[str] = None, resume_run_id: Optional[str] = None
):
    """Open an MLflow run, or stop with a clear message when the tracking store cannot be reached.

    ``resume_run_id``: continue that run (set RUNNING again) when this store has it, else start a new one.
    """
    if not cfg.enabled:
        return NullLogger()
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnrun.sweep import job as sweep_job

    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would hijack this run
    client = connect(cfg.uri)
    job = sweep_job.current()  # a sweep job's run goes under the sweep's parent run, tagged with its job number
    if job is not None:
        parent_run_id = parent_run_id or job.parent_for(cfg)
        tags = {**tags, **job.tags()}
        run_name = job.run_name(run_name)
    offline_dir = Path(tags.get("cnnrun.output_dir") or Path.cwd()) / OFFLINE_FOLDER

    def logger(run_id: str) -> MlflowLogger:
        mlflow.set_tracking_uri(cfg.uri)
        sweep_job.note_run(run_id)
        return MlflowLogger(client, run_id, cfg.uri, offline_dir, getattr(cfg, "log_model", True),
                            getattr(cfg, "register_model", None))

    try:
        experiment_id = ensure_experiment(client, cfg.experiment)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id and _has_run(client, resume_run_id):
            client.update_run(resume_run_id, status="RUNNING")
            return logger(resume_run_id)
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    except (MlflowException, OSError) as err:
        raise UserError(
            f"tracking.uri={cfg.uri} cannot be used: {str(err).splitlines()[0][:300]}\n"
            "  start the tracking server, fix the URI, or run with tracking.enabled=false"
        ) from None
    return logger(run.info.run_id)


def _has_run(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def ensure_experiment(client, name: str) -> str:
    """Get or create the experiment (tagged so MLflow 3's UI opens it on the runs table)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except MlflowException:
        # Another process created it between our lookup and create (parallel sweeps).
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id
