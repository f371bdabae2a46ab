"""Eight cnnrun processes logging to one local sqlite store at once all end FINISHED with every metric."""

import subprocess

import pytest

from tests.helpers import CNNRUN, mlflow_runs

TINY = ["trainer.epochs=2", "trainer.patience=null", "trainer.progress=false", "model.layers.0.filters=4",
        "model.layers.2.filters=4", "model.layers.5.units=16", "device.threads=1", "tracking.log_model=false"]


@pytest.mark.slow
def test_eight_processes_share_one_sqlite_store(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    procs = [
        subprocess.Popen(CNNRUN + TINY + [f"trainer.seed={seed}", f"tracking.uri={uri}"], cwd=workdir,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(8)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 8
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"train_loss", "val_acc", "test_acc", "images_per_s"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
