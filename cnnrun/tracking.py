"""Experiment tracking behind a small protocol; MLflow is the implementation cnnrun ships.

The trainer talks to a :class:`MetricLogger` only. :class:`MlflowLogger` batches metrics (one REST call or one
transaction per epoch, not one per value) and always ends its run: FINISHED, FAILED with the error as a tag,
or KILLED on interruption.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Protocol

from cnnrun.errors import UserError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3 opens experiments in its GenAI view without it


class MetricLogger(Protocol):
    run_id: Optional[str]

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None: ...

    def log_artifact(self, path: os.PathLike, artifact_path: Optional[str] = None) -> None: ...

    def log_dataset(self, dataset) -> None: ...

    def end(self, status: str, error: Optional[str] = None) -> None: ...


class NullLogger:
    """tracking.enabled=false: the trainer runs the same, nothing is recorded."""

    run_id = None

    def log_params(self, params): ...

    def set_tags(self, tags): ...

    def log_metrics(self, metrics, step=None): ...

    def log_artifact(self, path, artifact_path=None): ...

    def log_dataset(self, dataset): ...

    def end(self, status, error=None): ...


class MlflowLogger:
    """One MLflow run. Created by :func:`start_run`, which checks that the store answers before training."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id
        self._ended = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's per-batch param limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: os.PathLike, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, dataset) -> None:
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
        self.client.set_terminated(self.run_id, status=status)


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
    from mlflow.tracking import MlflowClient

    os.environ.pop("MLFLOW_RUN_ID", None)  # an inherited run id would hijack this run
    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        experiment_id = ensure_experiment(client, cfg.experiment)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id and _has_run(client, resume_run_id):
            client.update_run(resume_run_id, status="RUNNING")
            mlflow.set_tracking_uri(cfg.uri)
            return MlflowLogger(client, resume_run_id)
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    except (MlflowException, OSError) as err:
        raise UserError(
            f"tracking.uri={cfg.uri} cannot be used: {str(err).splitlines()[0][:300]}\n"
            "  start the tracking server, fix the URI, or run with tracking.enabled=false"
        ) from None
    mlflow.set_tracking_uri(cfg.uri)
    return MlflowLogger(client, run.info.run_id)


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
