"""The real pipeline at scale: classic_cnn on the full Fashion-MNIST (Debian's dataset-fashion-mnist) for one epoch
with every framework. Published two-layer CNNs reach about 0.91-0.92 after full training; one epoch gets ~0.88."""

import importlib.util
from pathlib import Path

import pytest

from cnnrun.backends import BACKENDS
from tests.helpers import mlflow_runs, run_cli

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(BACKENDS))
def test_one_epoch_of_full_fashion_mnist(framework, workdir, tracking_uri):
    if not DEBIAN_FASHION.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    if importlib.util.find_spec(BACKENDS[framework].module) is None:
        pytest.skip(f"no {framework} backend module")
    result = run_cli([f"framework={framework}", "dataset=fashion_mnist", "dataset.download=false", "trainer.epochs=1",
                      "trainer.progress=false", f"tracking.uri={tracking_uri}"], workdir,
                     env={"CNNRUN_DATA_DIR": str(workdir / "data")}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = mlflow_runs(tracking_uri)
    metrics = run.data.metrics
    print(f"\n{framework}: fashion_mnist 1 epoch test_acc={metrics['test_acc']:.4f} "
          f"images/s={metrics['images_per_s']:.0f}")
    assert run.info.status == "FINISHED"
    assert metrics["test_acc"] >= 0.85
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion_mnist"}
