"""Eight cnnrun processes logging to one local sqlite store at once all end FINISHED, each with its own numbers:
every value in MLflow is the one its own process computed (its final checkpoint's per-epoch history, its confusion
matrix), so no write is lost or lands in another process's run."""

import subprocess

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from tests.helpers import CNNRUN, mlflow_runs

TINY = ["trainer.epochs=2", "trainer.patience=null", "trainer.progress=false", "model.layers.0.filters=4",
        "model.layers.2.filters=4", "model.layers.5.units=16", "device=cpu", "device.threads=1",
        "tracking.log_model=false"]
PER_EPOCH = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.mark.slow
def test_eight_processes_share_one_sqlite_store(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # One output folder per process: started in the same second, they would share the default timestamped one.
    procs = [
        subprocess.Popen(CNNRUN + TINY + [f"trainer.seed={seed}", f"tracking.uri={uri}",
                                          f"hydra.run.dir={workdir / f'run{seed}'}"],
                         cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(8)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    client, runs = mlflow_runs(uri)
    assert len(runs) == 8
    by_seed = {int(run.data.params["trainer.seed"]): run for run in runs}
    assert sorted(by_seed) == list(range(8))
    for seed, run in by_seed.items():
        assert run.info.status == "FINISHED"
        own = workdir / f"run{seed}"
        assert run.data.tags["cnnrun.output_dir"] == str(own)
        final = ckpt_io.load(own / "model.safetensors")
        assert final.origin["run_id"] == run.info.run_id
        history = final.progress["history"]
        for key in PER_EPOCH:
            logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
            assert [(m.step, m.value) for m in logged] == [(row["epoch"] + 1, row[key]) for row in history], key
            assert run.data.metrics[key] == history[-1][key]
        counts = np.loadtxt(own / "confusion_matrix.csv", delimiter=",")
        assert run.data.metrics["test_acc"] == pytest.approx(np.trace(counts) / counts.sum(), abs=1e-12)
    assert len({run.data.metrics["val_loss"] for run in runs}) == 8  # eight seeds, eight different runs
