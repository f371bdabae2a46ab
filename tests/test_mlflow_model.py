"""The trained model as an MLflow pyfunc: logged with a signature and an input example, registered on request,
loaded with mlflow.pyfunc.load_model and served with `mlflow models serve`; it predicts from uint8 images and from
float images in [0, 1] alike, and refuses every other input with a message that says why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnrun.config import DatasetConfig
from cnnrun.data import load_dataset
from tests.helpers import mlflow_runs, run_cli
from tests.tiny import TINY, free_port, kill_group, wait_until_up

REGISTERED = "digits"


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(workdir, tracking uri, the training run, the test split) of a tiny model logged and registered."""
    workdir = tmp_path_factory.mktemp("mlflow_model")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = [a for a in TINY if not a.startswith("tracking.log_model")]  # tracking.log_model defaults to true
    result = run_cli(args + [f"tracking.uri={uri}", f"tracking.register_model={REGISTERED}"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr, result.stderr[-3000:]
    _, (run,) = mlflow_runs(uri)
    test = load_dataset(DatasetConfig(name="mnist_5k", num_classes=10, channels=1, image_size=(28, 28),
                                      download=False, val_fraction=0.3, test_fraction=0.6)).test
    return workdir, uri, run, test


@pytest.fixture(scope="module")
def model(logged):
    import mlflow

    workdir, uri, run, _ = logged
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model", dst_path=str(workdir / "loaded"))


@pytest.mark.slow
def test_logged_model_loads_with_pyfunc_and_predicts_like_the_run(logged, model):
    _, uri, run, test = logged
    client, _ = mlflow_runs(uri)
    (output,) = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).name == "model"
    assert model.metadata.metadata["cnnrun_framework"] == "torch"
    probabilities = model.predict(test.images)
    assert probabilities.shape == (len(test.images), 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float((probabilities.argmax(axis=1) == test.labels).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_acc"], abs=1e-9)  # the run's own test evaluation


@pytest.mark.slow
def test_the_model_has_a_signature_and_an_input_example(model):
    from mlflow.types.schema import TensorSpec

    (spec,) = model.metadata.signature.inputs.inputs
    assert isinstance(spec, TensorSpec) and spec.type == np.dtype("uint8") and spec.shape == (-1, 28, 28, 1)
    (out,) = model.metadata.signature.outputs.inputs
    assert out.type == np.dtype("float32") and out.shape == (-1, 10)
    example = model.input_example
    assert example.dtype == np.uint8 and example.shape[1:] == (28, 28, 1)
    assert model.predict(example).shape == (len(example), 10)


@pytest.mark.slow
def test_uint8_and_unit_float_images_give_the_same_probabilities_in_every_form(logged, model):
    import pandas as pd

    images = logged[3].images[:6]
    expected = model.predict(images)
    forms = {
        "uint8 (N, H, W, C)": images,
        "uint8 (N, H, W)": images[..., 0],
        "flattened rows in a DataFrame": pd.DataFrame(images.reshape(6, -1)),
        "int64 nested lists, as JSON gives": images.astype(np.int64).tolist(),
        "float32 in [0, 1]": images.astype(np.float32) / 255,
        "float64 in [0, 1]": images / 255.0,
        "float32 in [0, 1] (N, H, W)": images[..., 0].astype(np.float32) / 255,
        "{'inputs': ...} as a request": {"inputs": images},
    }
    for name, value in forms.items():
        np.testing.assert_allclose(model.predict(value), expected, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("make,message", [
    (lambda x: x.astype(np.float32), "expected float images in [0, 1]; received float32 values from 0 to 255 "
                                     "(pixel values 0..255: send them as integers"),
    (lambda x: x / 255.0 - 0.5, "expected float images in [0, 1]; received float64 values from -0.5"),
    (lambda x: np.where(x > 0, np.nan, 0.0), "received NaN or infinite values"),
    (lambda x: x.astype(np.int64) + 1, "expected integer pixel values 0..255; received int64 values from 1 to 256"),
    (lambda x: x.astype(np.int16) - 1, "expected integer pixel values 0..255; received int16 values from -1"),
    (lambda x: x > 0, "received dtype bool"),
    (lambda x: x.astype(str), "received dtype <U"),
    (lambda x: np.repeat(x, 3, axis=3), "1 channel(s) last; received 3 channel(s), shape (4, 28, 28, 3) "
                                       "(convert to grayscale)"),
    (lambda x: x.transpose(0, 3, 1, 2), "channels last; received channels first, shape (4, 1, 28, 28)"),
    (lambda x: x[:, :27], "expected images (N, 28, 28, 1), also (N, 28, 28) for one channel or flattened rows "
                          "(N, 784); received shape (4, 27, 28, 1)"),
    (lambda x: x[0], "received shape (28, 28, 1)"),
], ids=["float-0-255", "float-negative", "float-nan", "int-above-255", "int-negative", "bool", "strings",
        "three-channels", "channels-first", "wrong-size", "one-image-without-batch"])
def test_other_inputs_are_refused_with_the_reason(logged, model, make, message):
    from mlflow.exceptions import MlflowException

    images = logged[3].images[:4]
    with pytest.raises(MlflowException) as caught:
        model.predict(make(images))
    assert message in str(caught.value)


@pytest.mark.slow
def test_register_model_registers_a_version_linked_to_the_run(logged):
    from mlflow.tracking import MlflowClient

    _, uri, run, _ = logged
    client = MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions(f"name='{REGISTERED}'")
    assert str(version.version) == "1" and version.status == "READY"
    assert version.run_id == run.info.run_id
    (output,) = run.outputs.model_outputs
    assert version.source == f"models:/{output.model_id}"  # the logged model itself


class ServedModel:
    """`mlflow models serve` in its own process group, killed with the whole group."""

    def __init__(self, model_uri: str, tracking_uri: str, cwd: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = cwd / "serve.log"
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow)] if mlflow.exists() else [sys.executable, "-m", "mlflow"]
        command += ["models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                    "-p", self.url.rsplit(":", 1)[1], "-w", "1"]
        # it starts `uvicorn` by name: the environment's bin/ first on PATH, as in an activated virtualenv
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
        self.process = subprocess.Popen(command, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, cwd=cwd,
                                        env=env, start_new_session=True)

    def wait(self, timeout: float = 300) -> "ServedModel":
        wait_until_up(self.process, f"{self.url}/ping", self.log, "mlflow models serve", timeout)
        return self

    def invoke(self, payload) -> tuple:
        """(HTTP status, decoded JSON body) of POST /invocations."""
        request = urllib.request.Request(f"{self.url}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def kill(self) -> None:
        kill_group(self.process)


@pytest.mark.slow
def test_served_model_answers_like_task_predict(logged, tmp_path):
    workdir, uri, run, test = logged
    images = test.images[:8]
    for index, image in enumerate(images):
        Image.fromarray(image[..., 0], "L").save(tmp_path / f"{index}.png")
    (checkpoint,) = workdir.glob("outputs/*/*/model.safetensors")
    result = run_cli(["task=predict", f"checkpoint={checkpoint}", f"inputs={tmp_path}", "predict.top_k=10",
                      f"predict.output={tmp_path / 'preds.json'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = np.zeros((len(images), 10))
    for entry in json.loads((tmp_path / "preds.json").read_text())["predictions"]:
        for top in entry["top"]:
            predicted[int(Path(entry["file"]).stem), top["index"]] = top["probability"]

    server = ServedModel(f"runs:/{run.info.run_id}/model", uri, tmp_path)
    try:
        server.wait()
        status, body = server.invoke({"inputs": images.tolist()})
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["predictions"]), predicted, rtol=0, atol=1e-6)
        status, body = server.invoke({"inputs": (images / 255.0).tolist()})
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["predictions"]), predicted, rtol=0, atol=1e-6)
        status, body = server.invoke({"inputs": images.astype(float).tolist()})  # 0..255 as floats: refused
        assert status == 400, body
        assert "expected float images in [0, 1]" in body["message"]
    finally:
        server.kill()
