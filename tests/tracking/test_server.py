"""cnnrun against a real ``mlflow server`` over HTTP: runs read back through the REST API; the server unreachable
at the start (a clear error before training) and killed mid-run (training finishes, tracking kept locally)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
from pathlib import Path

import pytest

from tests.helpers import CNNRUN, run_cli
from tests.tiny import TINY, free_port, rest, rest_runs


@pytest.mark.slow
def test_training_through_a_tracking_server_is_read_back_over_rest(workdir, mlflow_server):
    server = mlflow_server()
    result = run_cli(TINY + [f"tracking.uri={server.url}", "tracking.experiment=remote"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    exp, runs = rest_runs(server.url, "remote")
    (run,) = runs
    assert exp["tags"] and {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == \
        "custom_model_development"
    assert run["info"]["status"] == "FINISHED"
    assert {"val_acc", "test_acc", "kept_val_acc"} <= set(run["metrics"])
    assert run["params"]["model.layers.0.filters"] == "4" and run["tags"]["cnnrun.framework"] == "torch"
    history = rest(server.url, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=val_acc")
    assert [m["step"] for m in history["metrics"]] == [1]
    listed = rest(server.url, f"artifacts/list?run_id={run['info']['run_id']}")
    names = {f["path"] for f in listed["files"]}
    assert {"model.safetensors", "learning_curve.png", "confusion_matrix.png", "config.yaml"} <= names
    assert not (workdir / "mlruns").exists() and not (workdir / "mlflow.db").exists()  # all on the server


@pytest.mark.parametrize("sweep", [[], ["-m", "optimizer.lr=1e-3,2e-3"]], ids=["run", "sweep"])
def test_unreachable_server_stops_before_training(workdir, sweep):
    started = time.monotonic()
    result = run_cli(sweep + TINY + [f"tracking.uri=http://127.0.0.1:{free_port()}"], workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("cannot be used") == 1 and "tracking.enabled=false" in result.stderr
    assert not list(workdir.glob("outputs/*/*/checkpoints/*"))  # stopped before any training
    assert not list(workdir.glob("multirun/*/*/0-*"))  # a sweep stops before its first job
    assert time.monotonic() - started < 90  # MLflow's own retries would take ~4 minutes


def _val_acc_logged(url: str) -> bool:
    try:
        _, runs = rest_runs(url, "cnnrun")
    except (urllib.error.URLError, KeyError, OSError):
        return False
    return any("val_acc" in run["metrics"] for run in runs)


@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_and_keeps_tracking_locally(workdir, mlflow_server):
    server = mlflow_server()
    args = [a for a in TINY if not a.startswith(("trainer.epochs", "dataset."))]
    # 4,000 training images and 4 epochs: long enough to kill the server after the first epoch is logged
    args += [f"tracking.uri={server.url}", "trainer.epochs=4", "trainer.patience=null",
             "dataset.val_fraction=0.1", "dataset.test_fraction=0.1"]
    process = subprocess.Popen(CNNRUN + args, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and not _val_acc_logged(server.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, "training ended before the server could be killed"
        server.kill()
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "stopped working" in output and "Traceback" not in output
    (out,) = workdir.glob("outputs/*/*")
    offline = out / "tracking_offline"
    assert str(offline) in output.replace("\n", "")
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "last.safetensors").is_file()
    rows = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows if r["key"] == "val_acc"} >= {4}  # the epochs after the kill
    assert any(r["key"] == "test_acc" for r in rows)
    status = json.loads((offline / "status.json").read_text())
    assert status["status"] == "FINISHED"
    artifacts = (offline / "artifacts.txt").read_text()
    assert "learning_curve.png" in artifacts and Path(artifacts.split("\t")[0]).exists()
