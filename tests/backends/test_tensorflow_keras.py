"""What is particular to the TensorFlow and Keras backends: devices, Keras's one-backend-per-process rule,
version strings, quiet start-up. Each check runs in a fresh interpreter (Keras fixes its backend at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

PRELUDE = """
import json, sys
from cnnrun.backends import create_runner, framework_version, validate_options
from cnnrun.config import DeviceConfig, OptimizerConfig
from cnnrun.errors import UserError
from cnnrun.spec import compile_model

MODEL = compile_model({"name": "t", "layers": [{"type": "conv2d", "filters": 2, "kernel": 3},
                                               {"type": "flatten"}, {"type": "dense", "units": 3}]}, (1, 6, 6), 3)

def runner(framework, device="cpu", threads=None, **options):
    return create_runner(framework, MODEL, OptimizerConfig(name="adam", lr=1e-3), validate_options(framework, options),
                         DeviceConfig(name=device, threads=threads), 0, (0.0,), (1.0,))

def error(fn):
    try:
        fn()
    except UserError as err:
        return str(err)
    return None
"""


def run_python(body: str, env=None):
    code = PRELUDE + textwrap.dedent(body)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_tensorflow_devices_threads_and_version():
    out, stderr = run_python("""
        r = runner("tensorflow", device="auto", threads=1)
        import tensorflow as tf
        print(json.dumps({
            "auto": r.device_name,
            "cuda": error(lambda: runner("tensorflow", device="cuda")),
            "cuda1": error(lambda: runner("tensorflow", device="cuda:1")),
            "threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "version": framework_version("tensorflow"),
            "keras_loaded": "keras" in sys.modules,
        }))
    """)
    assert out["auto"] == "cpu"
    for key in ("cuda", "cuda1"):
        assert "TensorFlow" in out[key] and "sees no usable GPU" in out[key] and "device=cpu" in out[key]
    assert out["threads"] == 1
    assert out["version"].startswith("2.")
    assert not out["keras_loaded"]  # TensorFlow's own eager `import keras` is masked (half its start-up time)
    assert "cudart_stub" not in stderr and "absl::InitializeLog" not in stderr, stderr


def test_keras_version_names_its_backend_and_engine():
    out, _ = run_python("""
        runner("keras", backend="tensorflow")
        import keras, tensorflow
        print(json.dumps({"version": framework_version("keras"), "keras": keras.__version__,
                          "tf": tensorflow.__version__}))
    """)
    assert out["version"] == f"{out['keras']} (tensorflow {out['tf']})"


def test_keras_cannot_switch_backends_in_one_process():
    out, _ = run_python("""
        runner("keras", backend="torch")
        print(json.dumps({"second": error(lambda: runner("keras", backend="tensorflow"))}))
    """)
    assert "framework.backend=tensorflow" in out["second"]
    assert "already imported in this process with its torch backend" in out["second"]


def test_keras_honours_framework_backend_over_the_environment():
    out, _ = run_python("""
        r = runner("keras", backend="torch")
        print(json.dumps({"backend": __import__("keras").backend.backend(), "tf": "tensorflow" in sys.modules}))
    """, env={"KERAS_BACKEND": "tensorflow"})
    assert out == {"backend": "torch", "tf": False}


def test_tensorflow_framework_ignores_a_torch_keras_backend_in_the_environment():
    out, _ = run_python("""
        runner("tensorflow")
        print(json.dumps({"torch": "torch" in sys.modules}))
    """, env={"KERAS_BACKEND": "torch"})
    assert out == {"torch": False}


def test_keras_on_torch_explains_jit_compile_and_devices():
    out, _ = run_python("""
        print(json.dumps({
            "jit": error(lambda: runner("keras", backend="torch", jit_compile=True)),
            "cuda": error(lambda: runner("keras", backend="torch", device="cuda")),
        }))
    """)
    assert "framework.jit_compile=true needs framework.backend=tensorflow" in out["jit"]
    assert "device=cuda" in out["cuda"] and "device=cpu" in out["cuda"]


def test_unknown_keras_backend_is_a_config_error():
    out, _ = run_python("""
        from cnnrun.errors import ConfigError
        try:
            validate_options("keras", {"backend": "jax"})
            print(json.dumps({"error": None}))
        except ConfigError as err:
            print(json.dumps({"error": str(err)}))
    """)
    assert "framework.backend" in out["error"]


def test_keras_on_torch_trains_on_held_batches_as_on_numpy_batches():
    """dataset.on_device's path for the Keras-on-torch runner (the resume suite holds data once per other runner
    class): images and labels held as torch tensors and gathered by an order train and predict bit for bit as
    the same NumPy batches do."""
    out, _ = run_python("""
        import numpy as np
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (24, 6, 6, 1), dtype=np.uint8)
        labels = rng.integers(0, 3, 24).astype(np.int64)
        order = rng.permutation(24)

        def train(r, batches):
            for x, y in batches:
                r.train_step(x, y)
            return r.train_metrics(), r.get_weights()

        host, held = runner("keras", backend="torch"), runner("keras", backend="torch")
        expected = train(host, [(images[order[i:i + 8]], labels[order[i:i + 8]]) for i in range(0, 24, 8)])
        all_images, all_labels, held_order = held.hold(images), held.hold(labels), held.hold(order)
        batches = [(held.gather(all_images, held_order[i:i + 8]), held.gather(all_labels, held_order[i:i + 8]))
                   for i in range(0, 24, 8)]
        got = train(held, batches)
        print(json.dumps({
            "held": type(batches[0][0]).__module__,
            "metrics": [list(expected[0]), list(got[0])],
            "weights": all(np.array_equal(expected[1][k], got[1][k]) for k in expected[1]),
            "logits": bool(np.array_equal(host.predict_logits(images[:5]), held.predict_logits(all_images[:5]))),
        }))
    """)
    assert out["held"] == "torch"
    assert out["metrics"][0] == out["metrics"][1]
    assert out["weights"] and out["logits"]
