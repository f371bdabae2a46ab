"""The CUDA paths: on a GPU each framework computes what it computes on the CPU, and trains there.

Skipped where no NVIDIA GPU is present (CI has none). Run on a GPU machine with ``pytest -m gpu``; Keras is tested
on the backend ``KERAS_BACKEND`` names (one backend per process). Frameworks that are not installed, or that see
no GPU (TensorFlow built without CUDA, Chainer without CuPy), are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import numpy as np
import pytest

from cnnrun.backends import BACKENDS, create_runner, validate_options
from cnnrun.config import DeviceConfig, OptimizerConfig
from cnnrun.errors import UserError
from cnnrun.spec import compile_model
from tests.helpers import shipped_model
from tests.reference import random_weights
from tests.specs import STRESS, STRESS_INPUT, without_dropout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU on this machine"),
]

MODELS = {
    "resnet_lite": (shipped_model("resnet_lite"), (1, 28, 28)),
    "stress": (without_dropout(STRESS), STRESS_INPUT),  # dropout masks come from each device's own RNG
}
FRAMEWORKS = [name for name, info in BACKENDS.items() if info.gpu]
ADAM = OptimizerConfig(name="adam", lr=1e-3, eps=1e-7)
# Gradients are compared through one plain SGD step with lr=1 (the weights move by exactly -gradient). Comparing
# weights after several Adam steps would not work: Adam moves a weight whose gradient is near zero by ±lr on
# either device depending on rounding (seen on an H200: 3.7e-3 after 3 steps).
SGD_UNIT = OptimizerConfig(name="sgd", lr=1.0)
# Per tensor, |g_gpu - g_cpu| <= GRADIENT_RTOL * max|g_cpu|. Seen on an H200 with the stress spec (gradients up
# to 37): torch 5e-7 relative, Chainer without cuDNN 5e-5 (its im2col convolutions sum in another order).
# resnet_lite is left out of this check: with random weights its ten batchnorms normalise by statistics of 16
# images, which amplifies rounding; gradients moved by up to 5% relative on the GPU, identically in torch, Keras
# and Chainer, so they measure the arithmetic's conditioning rather than any backend.
GRADIENT_RTOL = 2e-4


def _require_gpu(framework: str) -> None:
    """Skip unless ``framework`` is installed and sees a CUDA GPU (asked through the backend itself)."""
    info = BACKENDS[framework]
    missing = [p for p in info.engine_packages(_options(framework).model_dump()) if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    spec, input_shape = MODELS["stress"]
    try:
        _runner(framework, compile_model(spec, input_shape, 10), "cuda")
    except UserError as err:
        pytest.skip(str(err))


def _options(framework: str):
    """Keras runs on the backend KERAS_BACKEND names (one per process); other frameworks on their first engine."""
    engines = BACKENDS[framework].engines
    chosen = next((e for e in engines if e.get("backend") == os.environ.get("KERAS_BACKEND")), engines[0])
    return validate_options(framework, chosen)


def _runner(framework, model, device, optimizer=ADAM, precision="fp32"):
    channels = model.input_shape[0]
    return create_runner(
        framework, model, optimizer, _options(framework), DeviceConfig(name=device), 0,
        (0.5,) * channels, (0.25,) * channels, precision=precision,
    )


def _data(model, seed=1, batches=3, batch=16):
    rng = np.random.default_rng(seed)
    shape = model.input_shape
    images = rng.integers(0, 256, size=(batches, batch, *shape[1:], shape[0]), dtype=np.uint8)
    labels = rng.integers(0, model.num_classes, size=(batches, batch)).astype(np.int64)
    return images, labels


def _setup(framework, model_name):
    _require_gpu(framework)
    spec, input_shape = MODELS[model_name]
    model = compile_model(spec, input_shape, 10)
    return model, random_weights(model, seed=3), *_data(model)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gpu_logits_and_adam_losses_match_cpu(framework, model_name):
    model, weights, images, labels = _setup(framework, model_name)
    cpu, gpu = _runner(framework, model, "cpu"), _runner(framework, model, "cuda")
    assert "cuda" in gpu.device_name, gpu.device_name
    for runner in (cpu, gpu):
        runner.set_weights(weights)
    np.testing.assert_allclose(gpu.predict_logits(images[0]), cpu.predict_logits(images[0]), atol=1e-4, rtol=1e-4)

    def train(runner):
        losses = []
        for batch_images, batch_labels in zip(images, labels):
            runner.train_step(batch_images, batch_labels)
            losses.append(runner.train_metrics()[0])
        return losses

    np.testing.assert_allclose(train(gpu), train(cpu), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gpu_gradients_match_cpu(framework):
    model, weights, images, labels = _setup(framework, "stress")
    steps = {}
    for device in ("cpu", "cuda"):
        runner = _runner(framework, model, device, SGD_UNIT)
        runner.set_weights(weights)
        runner.train_step(images[0], labels[0])
        steps[device] = {name: value - weights[name] for name, value in runner.get_weights().items()}
    assert set(steps["cuda"]) == set(steps["cpu"]) == set(weights)
    for name, step in steps["cpu"].items():
        scale = float(np.max(np.abs(step)))
        assert np.isfinite(scale) and (scale > 0 or "moving" in name), name  # every parameter gets a gradient
        difference = float(np.max(np.abs(steps["cuda"][name] - step)))
        assert difference <= GRADIENT_RTOL * scale + 1e-6, f"{name}: {difference:.2e} of {scale:.2e}"


# trainer.precision on CUDA (tests/backends/test_precision.py states the tolerances: bf16 keeps 8 significant bits,
# fp16 11); Chainer runs fp16 (mixed16) only, on CUDA only.
LOW_PRECISION_ATOL = {"bf16": 2e-2, "fp16": 5e-3}


@pytest.mark.parametrize("precision", sorted(LOW_PRECISION_ATOL))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gpu_low_precision_matches_float32_and_trains(framework, precision):
    if precision not in BACKENDS[framework].precisions["cuda"]:
        pytest.skip(f"{framework} has no {precision} on CUDA")
    model, weights, images, labels = _setup(framework, "stress")
    fp32, low = _runner(framework, model, "cuda"), _runner(framework, model, "cuda", precision=precision)
    for runner in (fp32, low):
        runner.set_weights(weights)
    expected, actual = fp32.predict_logits(images[0]), low.predict_logits(images[0])
    assert actual.dtype == np.float32
    off = float(np.max(np.abs(actual - expected)))
    assert 1e-4 < off <= LOW_PRECISION_ATOL[precision], f"{precision} logits {off:.3g} from float32's"
    losses = []
    for _ in range(8):  # the same batch again and again: the loss must fall
        low.train_step(images[0], labels[0])
        losses.append(low.train_metrics()[0])
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    assert {w.dtype for w in low.get_weights().values()} == {np.dtype(np.float32)}


def _train_on(runner, batches):
    for batch_images, batch_labels in batches:
        runner.train_step(batch_images, batch_labels)
    return runner.train_metrics(), runner.get_weights()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gpu_batches_staged_on_another_thread_or_gathered_from_held_images_train_as_host_batches(framework):
    """Runner.stage (the prefetch thread's copy to the GPU) and hold/gather (dataset.on_device) change where a
    batch comes from, not what the step computes: the same weights, bit for bit, as NumPy batches."""
    import concurrent.futures

    model, weights, images, labels = _setup(framework, "stress")
    host, staged, held = (_runner(framework, model, "cuda") for _ in range(3))
    for runner in (host, staged, held):
        runner.set_weights(weights)
    expected = _train_on(host, zip(images, labels))

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cnnrun-prefetch") as pool:
        copies = [pool.submit(lambda x, y: (staged.stage(x), staged.stage(y)), x, y).result()
                  for x, y in zip(images, labels)]
    got = _train_on(staged, copies)

    all_images = held.hold(images.reshape(-1, *images.shape[2:]))
    all_labels = held.hold(labels.reshape(-1))
    batch = labels.shape[1]
    gathered = []
    for i in range(len(labels)):
        index = held.hold(np.arange(i * batch, (i + 1) * batch, dtype=np.int64))
        gathered.append((held.gather(all_images, index), held.gather(all_labels, index)))
    assert held.device_memory() is None or held.device_memory() > 0
    for name, (metrics, trained) in {"staged": got, "held": _train_on(held, gathered)}.items():
        np.testing.assert_allclose(metrics, expected[0], rtol=0, atol=0, err_msg=name)
        for tensor, value in expected[1].items():
            np.testing.assert_array_equal(trained[tensor], value, err_msg=f"{name}: {tensor}")


@pytest.mark.parametrize("autotune", [True, False])
def test_torch_runner_sets_cudnn_autotuning_as_framework_cudnn_benchmark_says(autotune):
    import torch

    from cnnrun.backends import TorchOptions

    _require_gpu("torch")
    spec, input_shape = MODELS["stress"]
    create_runner("torch", compile_model(spec, input_shape, 10), ADAM, TorchOptions(cudnn_benchmark=autotune),
                  DeviceConfig(name="cuda"), 0, (0.5,), (0.25,))
    assert torch.backends.cudnn.benchmark is autotune
