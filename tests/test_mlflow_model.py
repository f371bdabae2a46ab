"""The trained model as an MLflow pyfunc: mlflow.pyfunc.load_model on the run's model URI predicts."""

from __future__ import annotations

import numpy as np
import pytest

from cnnrun.config import DatasetConfig
from cnnrun.data import load_dataset
from tests.helpers import mlflow_runs, run_cli
from tests.tiny import TINY


@pytest.mark.slow
def test_logged_model_loads_with_pyfunc_and_predicts_like_the_run(workdir, tracking_uri):
    args = [a for a in TINY if not a.startswith("tracking.log_model")]  # tracking.log_model defaults to true
    result = run_cli(args + [f"tracking.uri={tracking_uri}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    client, (run,) = mlflow_runs(tracking_uri)
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == "model"

    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(workdir / "loaded"))
    assert model.metadata.metadata["cnnrun_framework"] == "torch"
    dataset = load_dataset(DatasetConfig(name="mnist_5k", num_classes=10, channels=1, image_size=(28, 28),
                                         download=False, val_fraction=0.3, test_fraction=0.6))
    probabilities = model.predict(dataset.test.images)
    assert probabilities.shape == (len(dataset.test.images), 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probabilities.argmax(axis=1) == dataset.test.labels).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=1e-9)  # the run's own test evaluation
    # the same images as a DataFrame of flattened rows, or as float pixel values
    import pandas as pd

    few = dataset.test.images[:5]
    np.testing.assert_allclose(model.predict(pd.DataFrame(few.reshape(5, -1))), probabilities[:5], atol=1e-6)
    np.testing.assert_allclose(model.predict(few.astype(np.float32)), probabilities[:5], atol=1e-6)

