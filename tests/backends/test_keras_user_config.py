"""cnnrun's Keras network is the same whatever the user's Keras settings say: a keras.json (through $KERAS_HOME)
with channels_first, float16, a large epsilon and another backend gives torch's logits and training step, on both
Keras backends, whether cnnrun imports Keras or the user's code did first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnrun.backends.keras import OWN_KERAS_HOME
from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("equivalence_worker.py")
ODD = {"floatx": "float16", "epsilon": 0.5, "backend": "jax", "image_data_format": "channels_first"}
SPEC = {"name": "odd", "layers": [
    {"type": "conv2d", "filters": 4, "kernel": [3, 2], "padding": "same", "activation": "relu"},
    {"type": "maxpool", "size": 2},
    {"type": "batchnorm"},
    {"type": "flatten"},
    {"type": "dense", "units": 5},
]}
INPUT = (2, 6, 8)
# The user's code imported Keras (reading their keras.json) before cnnrun built its network.
IMPORTED_FIRST = ("import sys, runpy, keras; assert keras.config.image_data_format() == 'channels_first'; "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_home")
    (folder / "user_keras").mkdir()
    (folder / "user_keras" / "keras.json").write_text(json.dumps(ODD))
    rng = np.random.default_rng(0)
    c, h, w = INPUT
    data = {f"weights/{k}": v for k, v in initial_weights(compile_model(SPEC, INPUT, 5), 3).items()}
    data["images"] = rng.integers(0, 256, (4, h, w, c), dtype=np.uint8)
    data["batch_images"] = rng.integers(0, 256, (1, 8, h, w, c), dtype=np.uint8)
    data["batch_labels"] = rng.integers(0, 5, (1, 8)).astype(np.int64)
    np.savez(folder / "odd.npz", **data)
    case = {"name": "odd", "spec": SPEC, "input_shape": list(INPUT), "num_classes": 5, "mean": [100.0, 90.0],
            "std": [50.0, 60.0], "data": str(folder / "odd.npz"),
            "commands": [{"kind": "forward"}, {"kind": "train", "optimizer": {"name": "sgd", "lr": 0.1}}]}
    return folder, case


def _run(job, framework, options, imported_first=False):
    folder, case = job
    name = f"{framework}-{options.get('backend', '')}-{imported_first}"
    job_file, out_file = folder / f"{name}.json", folder / f"{name}.npz"
    job_file.write_text(json.dumps({"framework": framework, "options": options, "cases": [case]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "KERAS_HOME": str(folder / "user_keras")}
    if imported_first:
        env["KERAS_BACKEND"] = options["backend"]
    prefix = ["-c", IMPORTED_FIRST] if imported_first else []
    proc = subprocess.run([sys.executable, *prefix, str(WORKER), str(job_file), str(out_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out_file))


@pytest.fixture(scope="module")
def reference(job):
    return _run(job, "torch", {})


@pytest.mark.parametrize("backend,imported_first", [("tensorflow", False), ("torch", False), ("torch", True)])
def test_keras_ignores_the_users_keras_json(job, reference, backend, imported_first):
    result = _run(job, "keras", {"backend": backend}, imported_first)
    assert result["odd/forward/logits"].dtype == np.float32
    np.testing.assert_allclose(result["odd/forward/logits"], reference["odd/forward/logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(result["odd/train/losses"], reference["odd/train/losses"], rtol=0, atol=1e-4)
    for name in ("dense_4/kernel", "batchnorm_2/moving_variance"):
        np.testing.assert_allclose(result[f"odd/train/weights/{name}"], reference[f"odd/train/weights/{name}"],
                                   rtol=0, atol=1e-4)
    assert json.loads((job[0] / "user_keras" / "keras.json").read_text()) == ODD  # the user's file untouched
    assert sorted(p.name for p in OWN_KERAS_HOME.iterdir()) == ["keras.json"]
