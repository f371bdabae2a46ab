"""Batchnorm on a channel whose mean is thousands of times its spread (a conv bias far from zero): the batch
variance must be the mean of squared deviations in every framework. E[x²] − E[x]² cancels in float32 there
(at x ≈ 3000 a float32 step of x² is 0.5, against a variance of ~2), which lost the running-variance update
and moved the loss by 0.2. One SGD step per framework in its own process (tests/backends/equivalence_worker.py),
compared with PyTorch's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cnnrun.spec import compile_model
from cnnrun.spec.init import initial_weights
from tests.backends.test_equivalence import OTHERS, REFERENCE, ROOT, WORKER, Variant, _param

pytestmark = pytest.mark.slow

SPEC = {"name": "large_mean", "layers": [
    {"type": "conv2d", "filters": 3, "kernel": 1},
    {"type": "batchnorm", "momentum": 0.9},
    {"type": "flatten"},
    {"type": "dense", "units": 10},
]}
INPUT = (1, 6, 6)
OFFSET = 3000.0  # each channel's mean; the 1×1 conv's spread is ~1


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large_mean")
    weights = initial_weights(compile_model(SPEC, INPUT, 10), 0)
    weights["conv2d_0/bias"] = np.full(3, OFFSET, np.float32) + np.arange(3, dtype=np.float32)
    rng = np.random.default_rng(5)
    data = {f"weights/{k}": v for k, v in weights.items()}
    data["batch_images"] = rng.integers(0, 256, (1, 32, 6, 6, 1), dtype=np.uint8)
    data["batch_labels"] = rng.integers(0, 10, (1, 32)).astype(np.int64)
    np.savez(folder / "large_mean.npz", **data)
    case = {"name": "large_mean", "spec": SPEC, "input_shape": list(INPUT), "num_classes": 10,
            "mean": [33.3], "std": [78.6], "data": str(folder / "large_mean.npz"),
            "commands": [{"kind": "train", "optimizer": {"name": "sgd", "lr": 0.01}}]}
    return folder, case


def _run(job, variant: Variant):
    folder, case = job
    job_file, out_file = folder / f"{variant.id}.json", folder / f"{variant.id}.npz"
    job_file.write_text(json.dumps({"framework": variant.framework, "options": variant.options, "cases": [case]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(WORKER), str(job_file), str(out_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out_file))


@pytest.fixture(scope="module")
def reference(job):
    return _run(job, Variant(REFERENCE, REFERENCE))


def test_the_reference_sees_a_large_mean_and_updates_its_running_variance(reference):
    mean = reference["large_mean/train/weights/batchnorm_1/moving_mean"]
    variance = reference["large_mean/train/weights/batchnorm_1/moving_variance"]
    np.testing.assert_allclose(mean, 0.1 * (OFFSET + np.arange(3)), rtol=1e-3)  # momentum 0.9 from 0
    assert np.all(np.abs(variance - 0.9) > 0.01)  # 0.9·1 + 0.1·(a batch variance of order 1)


@pytest.mark.parametrize("variant", [_param(v) for v in OTHERS])
def test_one_step_on_a_large_mean_channel_matches_torch(job, reference, variant):
    result = _run(job, variant)
    key = "large_mean/train"
    np.testing.assert_allclose(result[f"{key}/losses"], reference[f"{key}/losses"], rtol=0, atol=1e-3)
    for stat in ("moving_mean", "moving_variance"):
        name = f"{key}/weights/batchnorm_1/{stat}"
        np.testing.assert_allclose(result[name], reference[name], rtol=1e-4, atol=1e-4, err_msg=stat)
