"""Multirun sweeps through the real CLI: one MLflow parent run per sweep with a child per job, failures recorded
without stopping the sweep, resuming by re-running, parallel jobs (joblib) and Optuna searches."""

from __future__ import annotations

import csv
import os

import pytest

from tests.helpers import mlflow_runs, run_cli
from tests.tiny import TINY


def _sweep(uri):
    client, runs = mlflow_runs(uri)
    parents = [r for r in runs if r.data.tags.get("cnnrun.task") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cnnrun.task") == "train"]
    return client, parents, children


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_rerunning_the_sweep_skips_finished_jobs(workdir, tracking_uri):
    # job 0 trains; job 1 diverges; jobs 2 and 3 have an invalid model (a config error before any run opens)
    args = ["-m"] + TINY + [f"tracking.uri={tracking_uri}", "optimizer=sgd", "trainer.log_every=1",
                            "model.layers.0.filters=4,-1", "optimizer.lr=0.01,1e12"]
    first = run_cli(args, workdir)
    assert first.returncode == 2, first.stderr[-3000:]  # Hydra reports the failure, after every job ran
    assert "Traceback" not in first.stderr and "training diverged" in first.stderr
    _, (parent,), children = _sweep(tracking_uri)
    assert parent.info.run_name.startswith("sweep-") and parent.info.status == "FAILED"
    assert os.path.isdir(parent.data.tags["cnnrun.sweep.dir"])
    assert sorted(int(c.data.tags["cnnrun.sweep.job"]) for c in children) == [0, 1, 2, 3]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    finished = [c for c in children if c.info.status == "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(finished) == 1 and len(failed) == 3, [(c.info.status, c.data.tags) for c in children]
    (ok,) = finished
    assert "model.layers.0.filters=4" in ok.data.tags["cnnrun.sweep.job_overrides"]
    assert "optimizer.lr=0.01" in ok.data.tags["cnnrun.sweep.job_overrides"]
    errors = sorted(c.data.tags["cnnrun.error"] for c in failed)
    assert sum("diverged" in e for e in errors) == 1 and sum("filters" in e for e in errors) == 2
    # the parent's summary: counts, the best job and its metric
    assert parent.data.metrics["jobs_total"] == 4 and parent.data.metrics["jobs_failed"] == 3
    assert parent.data.tags["cnnrun.sweep.best_run_id"] == ok.info.run_id
    assert parent.data.metrics["kept_val_acc"] == ok.data.metrics["kept_val_acc"]
    assert "| FAILED |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.params["optimizer.lr"] == "0.01,1e12"  # what the sweep varies
    # the table printed at the end, best first, failures listed under it
    assert "best first by kept_val_acc" in first.stderr and first.stderr.count(" FAILED: ") == 3
    (summary,) = workdir.glob("multirun/*/*/sweep_summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FAILED", "FAILED"]

    # the same command again: the finished job is skipped, the others run again, under the same parent
    second = run_cli(args, workdir)
    assert second.returncode == 2
    assert f"already FINISHED as run {ok.info.run_id}" in second.stderr
    client, parents, children = _sweep(tracking_uri)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert len([c for c in children if c.info.status == "FINISHED"]) == 1  # nothing trained twice
    assert len(children) == 4 + 3
    summaries = sorted(workdir.glob("multirun/*/*/sweep_summary.csv"))
    assert [r["status"] for r in csv.DictReader(summaries[-1].open())][0] == "SKIPPED"

    # sweep.rerun=true trains it again (a new parent: a different command)
    third = run_cli(["-m"] + TINY + [f"tracking.uri={tracking_uri}", "optimizer=sgd", "trainer.log_every=1",
                                     "model.layers.0.filters=4", "optimizer.lr=0.01", "sweep.rerun=true"], workdir)
    assert third.returncode == 0, third.stderr[-3000:]
    _, parents, children = _sweep(tracking_uri)
    assert len(parents) == 2 and len([c for c in children if c.info.status == "FINISHED"]) == 2


@pytest.mark.slow
def test_parallel_sweep_records_each_job_once_under_one_parent(workdir, tracking_uri):
    args = ["-m"] + TINY + [f"tracking.uri={tracking_uri}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3",
                            "optimizer.lr=1e-3,2e-3,3e-3", "model.layers.2.filters=4,8"]
    result = run_cli(args, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (parent,), children = _sweep(tracking_uri)
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(int(c.data.tags["cnnrun.sweep.job"]) for c in children) == list(range(6))
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["cnnrun.config_hash"] for c in children}) == 6
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_finished"] == 6
    assert parent.data.tags["cnnrun.sweep.launcher"] == "joblib"
    cores = len(os.sched_getaffinity(0))
    assert {c.data.params["device.threads"] for c in children} == {str(max(1, cores // 3))}


@pytest.mark.slow
def test_optuna_search_trials_are_child_runs(workdir, tracking_uri):
    args = [a for a in TINY if not a.startswith("model.layers.5.units")]
    result = run_cli(["-m", "hparams_search=mnist_optuna", "hydra.sweeper.n_trials=3", *args,
                      f"tracking.uri={tracking_uri}", "model.layers.5.units=choice(16, 32)"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (parent,), children = _sweep(tracking_uri)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["cnnrun.sweep.sweeper"] == "optuna"
    assert parent.data.params["optimizer.lr"].startswith("tag(log")  # the shipped search space
    assert {c.data.params["model.layers.5.units"] for c in children} <= {"16", "32"}
    best = max(c.data.metrics["kept_val_acc"] for c in children)
    assert parent.data.metrics["kept_val_acc"] == best
    assert all(c.data.params["trainer.epochs"] == "1" for c in children)  # the command line beats the file


@pytest.mark.slow
def test_a_validation_objective_without_a_validation_split_fails_the_job_before_training(workdir, tracking_uri):
    args = [a for a in TINY if not a.startswith("dataset.val_fraction")]
    result = run_cli(["-m", *args, f"tracking.uri={tracking_uri}", "dataset.val_fraction=0",
                      "sweep.objective=kept_val_acc,test_acc"], workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("sweep.objective: 'kept_val_acc' is a validation metric, but dataset=mnist_5k has no validation split "
            "here (dataset.val_fraction=0.0); available: 'train_loss'") in result.stderr
    _, _, children = _sweep(tracking_uri)
    failed, trained = sorted(children, key=lambda c: int(c.data.tags["cnnrun.sweep.job"]))
    assert failed.info.status == "FAILED" and "sweep.objective" in failed.data.tags["cnnrun.error"]
    assert "train_loss" not in failed.data.metrics  # refused before training
    assert trained.info.status == "FINISHED" and "kept_val_acc" not in trained.data.metrics
