"""The PyTorch backend against the compiler's shapes and the NumPy reference."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cnnrun.backends import TorchOptions, create_runner
from cnnrun.backends.torch import Network
from cnnrun.config import DeviceConfig, OptimizerConfig
from cnnrun.errors import UserError
from cnnrun.spec import compile_model
from tests.helpers import shipped_model
from tests.reference import random_weights, reference_logits
from tests.specs import MOBILE, MOBILE_INPUT, POOLING, POOLING_INPUT, STRESS, STRESS_INPUT, refused

ADAM = OptimizerConfig(name="adam", lr=1e-3)
CPU = DeviceConfig(name="cpu")


def runner_for(model, seed=0):
    c = model.input_shape[0]
    return create_runner("torch", model, ADAM, TorchOptions(), CPU, seed, (0.0,) * c, (1.0,) * c)


GRID = list(itertools.product([(1, 9, 9), (2, 10, 7)], [1, 2, 3, 4], [1, 2, 3], ["same", "valid", 1]))


@pytest.mark.parametrize("input_shape,kernel,stride,padding", GRID)
def test_shapes_and_params_equal_the_compilers(input_shape, kernel, stride, padding):
    spec = {"name": "grid", "layers": [
        {"type": "conv2d", "filters": 3, "kernel": kernel, "stride": stride, "padding": padding},
        {"type": "maxpool", "size": kernel, "stride": stride, "padding": padding if padding != 1 or kernel > 1 else 0},
        {"type": "flatten"},
        {"type": "dense", "units": 10},
    ]}
    if refused(spec, input_shape):
        return
    model = compile_model(spec, input_shape, 10)
    net = Network(model)
    x = torch.zeros(2, *input_shape)
    for layer, module in zip(model.layers, net.layers):
        x = module(x)
        assert tuple(x.shape[1:]) == layer.out_shape, layer.name
    assert sum(p.numel() for p in net.parameters()) == model.params


@pytest.mark.parametrize("name", ["classic_cnn", "resnet_lite"])
def test_shipped_models_param_counts_equal_torch(name):
    model = compile_model(shipped_model(name), (1, 28, 28), 10)
    assert sum(p.numel() for p in Network(model).parameters()) == model.params


@pytest.mark.parametrize("spec,input_shape", [(STRESS, STRESS_INPUT), (POOLING, POOLING_INPUT),
                                              (MOBILE, MOBILE_INPUT),
                                              (shipped_model("resnet_lite"), (1, 28, 28))])
def test_logits_equal_numpy_reference(spec, input_shape):
    model = compile_model(spec, input_shape, 10)
    runner = runner_for(model)
    weights = random_weights(model, seed=3)
    runner.set_weights(weights)
    images = np.random.default_rng(0).integers(0, 256, size=(4, input_shape[1], input_shape[2], input_shape[0]),
                                               dtype=np.uint8)
    got = runner.predict_logits(images)
    expected = reference_logits(model, weights, images.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_weights_round_trip_and_training_state():
    model = compile_model(STRESS, STRESS_INPUT, 10)
    runner = runner_for(model)
    weights = random_weights(model, seed=1)
    runner.set_weights(weights)
    back = runner.get_weights()
    assert set(back) == set(weights)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])
    images = np.zeros((8, 27, 29, 3), np.uint8)
    runner.train_step(images, np.arange(8) % 10)
    state = runner.get_training_state()
    assert any(k.endswith("exp_avg") for k in state)
    other = runner_for(model)
    other.set_training_state(state)
    assert set(other.get_training_state()) == set(state)


def test_initial_weights_are_seeded_and_shared():
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    a, b, c = runner_for(model, 0).get_weights(), runner_for(model, 0).get_weights(), runner_for(model, 1).get_weights()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv2d_0/kernel"], c["conv2d_0/kernel"])


def test_training_reduces_loss_and_metrics_sync_only_when_asked():
    model = compile_model(shipped_model("classic_cnn"), (1, 28, 28), 10)
    runner = runner_for(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, 32)
    first = None
    for _ in range(15):
        runner.train_step(images, labels)
        loss, acc, count = runner.train_metrics()
        first = first if first is not None else loss
    assert count == 32 and loss < first


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model = compile_model(POOLING, POOLING_INPUT, 10)
    with pytest.raises(UserError, match="PyTorch sees no usable CUDA GPU"):
        create_runner("torch", model, ADAM, TorchOptions(), DeviceConfig(name="cuda"), 0, (0.0,) * 2, (1.0,) * 2)


def test_tensor_index_follows_the_module_after_a_move():
    # Module.to() replaces buffers with new tensors (on a GPU move too): the canonical index must follow, or
    # set_weights would fill stale copies and checkpoints would carry initial batchnorm statistics.
    model = compile_model(shipped_model("resnet_lite"), (1, 28, 28), 10)
    net = Network(model).to(torch.float64)
    for name, tensor in net.tensors.items():
        assert tensor.dtype == torch.float64, name
    runner = runner_for(model)
    runner.net.to(torch.float64)
    weights = {name: value.astype(np.float64) + 1.0 for name, value in runner.get_weights().items()}
    runner.set_weights(weights)
    for module in runner.net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.all(module.running_var >= 1.0)
