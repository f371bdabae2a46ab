"""task=train end to end through the real CLI, read back through MlflowClient."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnrun import checkpoint as ckpt_io
from tests.helpers import CNNRUN, GPU_SKIP_REASON, mlflow_runs, run_cli, torch_sees_a_gpu


@pytest.mark.slow
def test_readme_main_job_reaches_95_percent_and_records_everything(workdir):
    """README command 1's job: default config, default local store (device=auto: the CPU here)."""
    if torch_sees_a_gpu():
        pytest.skip(GPU_SKIP_REASON)
    result = run_cli(["trainer.progress=false"], workdir)
    assert result.returncode == 0, result.stderr
    client, runs = mlflow_runs(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "classic_cnn-torch-cpu"
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert metrics["test_acc"] >= 0.95
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds", "images_per_s", "test_loss"):
        assert key in metrics
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == list(range(1, len(history) + 1))
    assert params["model.layers.0.filters"] == "32" and params["framework.name"] == "torch"
    assert params["optimizer.eps"] == "1e-07" and params["dataset.name"] == "mnist_5k"
    assert 20 <= len(params) <= 100
    assert tags["cnnrun.framework"] == "torch" and tags["cnnrun.framework_version"].startswith("2.")
    assert tags["cnnrun.device"] == "cpu" and "cnnrun.output_dir" in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.txt", "summary.json", "model.safetensors", "learning_curve.png",
            "confusion_matrix.png"} <= artifacts
    exp = client.get_experiment_by_name("cnnrun")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset_input,) = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert dataset_input == "mnist_5k"
    ckpt = ckpt_io.load(client.download_artifacts(run.info.run_id, "model.safetensors", str(workdir)))
    assert ckpt.origin["run_id"] == run.info.run_id and ckpt.spec["name"] == "classic_cnn"


def _metrics(uri):
    _, runs = mlflow_runs(uri)
    return [{k: v for k, v in r.data.metrics.items() if k not in ("epoch_seconds", "images_per_s")} for r in runs]


@pytest.mark.slow
def test_same_seed_same_metrics(workdir, tracking_uri):
    args = ["trainer.epochs=2", "trainer.progress=false", f"tracking.uri={tracking_uri}", "device=cpu",
            "model.layers.5.units=64"]
    for _ in range(2):
        assert run_cli(args, workdir).returncode == 0
    first, second = _metrics(tracking_uri)
    assert first == second and "test_acc" in first


def test_divergence_fails_the_run_with_a_hint(workdir, tracking_uri):
    result = run_cli(["optimizer=sgd", "optimizer.lr=1e12", "trainer.log_every=1", "trainer.epochs=1",
                      "model.layers.5.units=32", f"tracking.uri={tracking_uri}"], workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training diverged" in result.stderr and "optimizer.lr" in result.stderr
    _, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["cnnrun.error"]


def _last_checkpoint(workdir):
    found = sorted(workdir.glob("outputs/*/*/checkpoints/last.safetensors"))
    assert found, "no checkpoint written"
    return ckpt_io.load(found[-1])


def test_max_time_stops_cleanly_with_state_saved(workdir, tracking_uri):
    result = run_cli(["trainer.max_time=3", "trainer.epochs=50", f"tracking.uri={tracking_uri}",
                      "trainer.progress=false"], workdir)
    assert result.returncode == 130, result.stderr
    assert "stopped by trainer.max_time" in result.stderr and "Traceback" not in result.stderr
    _, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "KILLED"
    ckpt = _last_checkpoint(workdir)
    assert ckpt.training_state and ckpt.progress["epoch"] + ckpt.progress["batch"] > 0


def test_ctrl_c_ends_the_run_killed(workdir, tracking_uri):
    proc = subprocess.Popen(CNNRUN + ["trainer.epochs=50", f"tracking.uri={tracking_uri}", "trainer.progress=false"],
                            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(workdir.glob("outputs/*/*/checkpoints/last.safetensors")):
        time.sleep(0.5)  # wait for the first epoch to finish, so training is really under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and "Traceback" not in err
    _, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "KILLED"


def test_early_stopping_on_a_validation_set_that_cannot_be_learned():
    """Validation labels shuffled: val loss rises as the model learns, so training stops after `patience`."""
    from cnnrun.backends import TorchOptions, create_runner
    from cnnrun.config import DeviceConfig, OptimizerConfig, TrainerConfig
    from cnnrun.data import Dataset, Split
    from cnnrun.progress import ProgressView
    from cnnrun.spec import compile_model
    from cnnrun.tracking import NullLogger
    from cnnrun.trainer import Trainer
    from tests.helpers import shipped_model

    from types import SimpleNamespace
    from cnnrun.data import load_dataset

    data = load_dataset(SimpleNamespace(name="mnist_5k", val_fraction=0.1, test_fraction=0.2, split_seed=0,
                                        num_classes=10))
    rng = np.random.default_rng(0)
    val = Split(data.val.images, rng.permutation(data.val.labels))
    dataset = Dataset("shuffled", data.train, val, data.test, data.class_names, "test")
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    runner = create_runner("torch", model, OptimizerConfig(name="adam", lr=1e-3), TorchOptions(),
                           DeviceConfig(name="cpu"), 0, dataset.mean, dataset.std)
    saved = []
    trainer = Trainer(runner, dataset, TrainerConfig(epochs=20, patience=2, progress=False), NullLogger(),
                      ProgressView(False, 20), lambda kind, state: saved.append((kind, state.epoch)))
    state = trainer.fit()
    assert state.stopped_early and state.epoch == state.best_epoch + 3
    assert ("best", state.best_epoch + 1) in saved and saved[-1] == ("last", state.epoch)


def test_out_of_memory_suggests_a_smaller_batch(workdir, tracking_uri):
    """Under a 6 GiB address-space limit, a 3,500-image batch through 512-filter convs (5.6 GB of activations in
    the first layer alone) fails to allocate: a clear message naming a smaller batch, and a FAILED run."""
    if torch_sees_a_gpu():  # device=auto would put the batch on the GPU, where the host limit means nothing
        pytest.skip(GPU_SKIP_REASON)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))"
    code = f"{limit}; import sys; from cnnrun.cli import main; sys.argv[0] = 'cnnrun'; main()"
    result = subprocess.run([sys.executable, "-c", code, "trainer.batch_size=3500", "trainer.epochs=1",
                             "model.layers.0.filters=512", "model.layers.2.filters=512", "device.threads=1",
                             f"tracking.uri={tracking_uri}", "trainer.progress=false"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "out of memory" in result.stderr and "trainer.batch_size=1750" in result.stderr
    assert "Traceback" not in result.stderr
    _, (run,) = mlflow_runs(tracking_uri)
    assert run.info.status == "FAILED"


def test_kept_epoch_metrics_describe_the_tested_weights_not_the_best_accuracy():
    from cnnrun.tasks.train import kept_epoch_metrics
    from cnnrun.trainer import TrainState

    history = [{"epoch": 0, "val_loss": 0.50, "val_acc": 0.80}, {"epoch": 1, "val_loss": 0.40, "val_acc": 0.79},
               {"epoch": 2, "val_loss": 0.60, "val_acc": 0.85}]
    state = TrainState(epoch=3, best_epoch=1, best_val_loss=0.40, history=history)
    assert kept_epoch_metrics(state, restored_best=True) == {"kept_epoch": 2, "kept_val_loss": 0.40,
                                                             "kept_val_acc": 0.79}
    assert kept_epoch_metrics(state, restored_best=False) == {"kept_epoch": 3, "kept_val_loss": 0.60,
                                                              "kept_val_acc": 0.85}


@pytest.mark.slow
@pytest.mark.parametrize("restore_best", [True, False])
def test_the_logged_objective_is_the_kept_epochs(workdir, tracking_uri, restore_best):
    from cnnrun.sweep.objective import RUN_METRICS
    from tests.tiny import TINY

    args = [a for a in TINY if not a.startswith("trainer.epochs")]
    result = run_cli([*args, "trainer.epochs=3", "trainer.patience=null", f"trainer.restore_best={restore_best}",
                      "optimizer.lr=0.01", f"tracking.uri={tracking_uri}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = mlflow_runs(tracking_uri)
    metrics = run.data.metrics
    assert set(metrics) == set(RUN_METRICS)  # what sweep.objective may name is what a run logs
    val_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    val_acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
    kept = min(val_loss, key=val_loss.get) if restore_best else 3
    assert metrics["kept_epoch"] == kept
    assert metrics["kept_val_loss"] == val_loss[kept] and metrics["kept_val_acc"] == val_acc[kept]


class _RecordingLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def test_without_a_validation_split_every_epoch_runs_and_nothing_is_nan():
    """dataset.val_fraction=0: no early stopping, no best checkpoint, no validation metric, nothing NaN."""
    from types import SimpleNamespace

    from cnnrun.backends import TorchOptions, create_runner
    from cnnrun.config import DeviceConfig, OptimizerConfig, TrainerConfig
    from cnnrun.data import Dataset, Split, load_dataset
    from cnnrun.progress import ProgressView
    from cnnrun.spec import compile_model
    from cnnrun.trainer import Trainer

    data = load_dataset(SimpleNamespace(name="mnist_5k", val_fraction=0.0, test_fraction=0.2, split_seed=0,
                                        num_classes=10))
    assert len(data.val) == 0
    train = Split(data.train.images[:200], data.train.labels[:200])
    dataset = Dataset("no_val", train, data.val, data.test, data.class_names, "test")
    model = compile_model({"name": "t", "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]},
                          (1, 28, 28), 10)
    runner = create_runner("torch", model, OptimizerConfig(name="adam", lr=1e-3), TorchOptions(),
                           DeviceConfig(name="cpu"), 0, dataset.mean, dataset.std)
    saved, logger = [], _RecordingLogger()
    trainer = Trainer(runner, dataset, TrainerConfig(epochs=3, patience=1, batch_size=64, progress=False), logger,
                      ProgressView(False, 3), lambda kind, state: saved.append((kind, state.epoch)))
    state = trainer.fit()
    assert state.epoch == 3 and not state.stopped_early and state.best_epoch == -1
    assert saved == [("last", 1), ("last", 2), ("last", 3)]
    assert [step for step, _ in logger.logged] == [1, 2, 3]
    for _, metrics in logger.logged:
        assert set(metrics) == {"train_loss", "train_acc", "epoch_seconds", "images_per_s"}
        assert all(np.isfinite(v) for v in metrics.values())
    assert all(row["val_loss"] is None and row["val_acc"] is None for row in state.history)


@pytest.mark.slow
def test_training_without_a_validation_split_tests_the_last_epoch(workdir, tracking_uri):
    from tests.tiny import TINY

    args = [a for a in TINY if not a.startswith(("trainer.epochs", "dataset.val_fraction"))]
    result = run_cli([*args, "dataset.val_fraction=0", "trainer.epochs=2", "trainer.patience=1",
                      f"tracking.uri={tracking_uri}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = mlflow_runs(tracking_uri)
    metrics = run.data.metrics
    assert not any(key.startswith(("val_", "kept_val_")) for key in metrics), metrics
    assert metrics["kept_epoch"] == 2 and all(np.isfinite(v) for v in metrics.values())
    (out,) = workdir.glob("outputs/*/*/")
    assert not (out / "checkpoints" / "best.safetensors").exists()
    assert (out / "learning_curve.png").is_file()
    assert ckpt_io.load(out / "model.safetensors").progress["epoch"] == 2
