"""cnnrun.layout: canonical (OIHW, (out, in), C·H·W flatten) ↔ channels-last (HWIO, (in, out), H·W·C flatten).

The conversions are checked by meaning, not by restating them: a network computed in NCHW with canonical
weights must equal the same network computed in NHWC with the converted weights (pure NumPy), and once
against real TensorFlow ops in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cnnrun.layout import CHANNELS_FIRST, CHANNELS_LAST, flatten_permutation, from_canonical, to_canonical
from cnnrun.spec import compile_model

ROOT = Path(__file__).resolve().parents[1]

# conv → flatten → batchnorm → dense, plus a residual whose shortcut is a projection conv.
SPEC = {
    "name": "layout_probe",
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel": [3, 2], "padding": "valid"},
        {"type": "residual", "layers": [{"type": "conv2d", "filters": 6, "kernel": 1, "stride": 2}]},
        {"type": "flatten"},
        {"type": "batchnorm"},
        {"type": "dropout", "rate": 0.1},
        {"type": "dense", "units": 5},
    ],
}
INPUT = (2, 7, 6)  # C, H, W


def _model():
    return compile_model(SPEC, INPUT, 5)


def _random_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in model.weight_shapes().items()}


def conv_nchw(x, kernel, stride=(1, 1)):
    """Reference 'valid' convolution: x (N, C, H, W), kernel OIHW."""
    o, _, kh, kw = kernel.shape
    n, _, h, w = x.shape
    oh, ow = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, kernel)
    return out


def conv_nhwc(x, kernel, stride=(1, 1)):
    """The same convolution written channels-last: x (N, H, W, C), kernel HWIO."""
    kh, kw, _, o = kernel.shape
    n, h, w, _ = x.shape
    oh, ow = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
    out = np.zeros((n, oh, ow, o), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride[0] : i * stride[0] + kh, j * stride[1] : j * stride[1] + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, kernel)
    return out


def forward_canonical(weights, x_nchw):
    """SPEC in NCHW with canonical weights (batchnorm in inference mode)."""
    y = conv_nchw(x_nchw, weights["conv2d_0/kernel"]) + weights["conv2d_0/bias"][None, :, None, None]
    body = conv_nchw(y, weights["residual_1/conv2d_0/kernel"], (2, 2))
    body += weights["residual_1/conv2d_0/bias"][None, :, None, None]
    short = conv_nchw(y, weights["residual_1/shortcut/kernel"], (2, 2))
    short += weights["residual_1/shortcut/bias"][None, :, None, None]
    v = (body + short).reshape(len(x_nchw), -1)  # C·H·W
    bn = "batchnorm_3/"
    v = (v - weights[bn + "moving_mean"]) / np.sqrt(np.abs(weights[bn + "moving_variance"]) + 1e-3)
    v = v * weights[bn + "gamma"] + weights[bn + "beta"]
    return v @ weights["dense_5/kernel"].T + weights["dense_5/bias"]


def forward_channels_last(native, x_nhwc):
    """SPEC in NHWC with channels-last weights."""
    y = conv_nhwc(x_nhwc, native["conv2d_0/kernel"]) + native["conv2d_0/bias"]
    body = conv_nhwc(y, native["residual_1/conv2d_0/kernel"], (2, 2)) + native["residual_1/conv2d_0/bias"]
    short = conv_nhwc(y, native["residual_1/shortcut/kernel"], (2, 2)) + native["residual_1/shortcut/bias"]
    v = (body + short).reshape(len(x_nhwc), -1)  # H·W·C
    bn = "batchnorm_3/"
    v = (v - native[bn + "moving_mean"]) / np.sqrt(np.abs(native[bn + "moving_variance"]) + 1e-3)
    v = v * native[bn + "gamma"] + native[bn + "beta"]
    return v @ native["dense_5/kernel"] + native["dense_5/bias"]


def test_native_shapes_are_channels_last():
    model = _model()
    native = from_canonical(model, _random_weights(model), CHANNELS_LAST)
    assert native["conv2d_0/kernel"].shape == (3, 2, 2, 4)  # HWIO
    assert native["residual_1/shortcut/kernel"].shape == (1, 1, 4, 6)
    assert native["dense_5/kernel"].shape == (6 * 3 * 3, 5)  # (in, out)
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in native.values())


def test_channels_last_network_computes_the_canonical_one():
    model = _model()
    weights = _random_weights(model)
    native = from_canonical(model, weights, CHANNELS_LAST)
    x = np.random.default_rng(1).normal(size=(3, *INPUT))
    expected = forward_canonical(weights, x)
    actual = forward_channels_last(native, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_flatten_permutation_only_touches_layers_fed_by_a_flatten():
    model = _model()
    weights = _random_weights(model)
    native = from_canonical(model, weights, CHANNELS_LAST)
    np.testing.assert_array_equal(native["conv2d_0/bias"], weights["conv2d_0/bias"])
    assert not np.array_equal(native["batchnorm_3/gamma"], weights["batchnorm_3/gamma"])
    # the feature of canonical index c·H·W + h·W + w sits at h·W·C + w·C + c in channels-last order
    c, h, w = 6, 3, 3
    for ci, hi, wi in [(0, 0, 1), (5, 2, 0), (3, 1, 2)]:
        canonical = ci * h * w + hi * w + wi
        last = hi * w * c + wi * c + ci
        assert native["batchnorm_3/beta"][last] == weights["batchnorm_3/beta"][canonical]
        np.testing.assert_array_equal(native["dense_5/kernel"][last], weights["dense_5/kernel"][:, canonical])


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_round_trip_is_exact(layout):
    model = _model()
    weights = _random_weights(model, seed=3)
    back = to_canonical(model, from_canonical(model, weights, layout), layout)
    assert set(back) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_channels_first_is_the_identity_as_float32_copies():
    model = _model()
    weights = {k: v.astype(np.float64) for k, v in _random_weights(model).items()}
    out = from_canonical(model, weights, CHANNELS_FIRST)
    for name, value in weights.items():
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name], value.astype(np.float32))


@pytest.mark.parametrize("suffixes", [("kernel", "gamma"), ("bias", "beta", "moving_mean", "moving_variance")])
def test_a_subset_converts_like_the_full_set(suffixes):
    """Optimizer slots exist for trainable tensors only (no running statistics, maybe no biases or no kernels)."""
    model = _model()
    weights = _random_weights(model)
    full = from_canonical(model, weights, CHANNELS_LAST)
    subset = {k: v for k, v in weights.items() if k.endswith(suffixes)}
    partial = from_canonical(model, subset, CHANNELS_LAST)
    assert set(partial) == set(subset)
    for name in subset:
        np.testing.assert_array_equal(partial[name], full[name], err_msg=name)
    back = to_canonical(model, partial, CHANNELS_LAST)
    for name in subset:
        np.testing.assert_array_equal(back[name], weights[name], err_msg=name)


def test_batchnorm_on_a_feature_map_keeps_its_channel_order():
    """Only a batchnorm fed by a flatten is permuted; on a C×H×W map its vectors are per channel in any layout."""
    spec = {"name": "bn", "layers": [{"type": "conv2d", "filters": 3, "kernel": 3}, {"type": "batchnorm"},
                                     {"type": "flatten"}, {"type": "dense", "units": 2}]}
    model = compile_model(spec, (1, 5, 5), 2)
    weights = _random_weights(model)
    native = from_canonical(model, weights, CHANNELS_LAST)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(native[f"batchnorm_1/{name}"], weights[f"batchnorm_1/{name}"])


def test_flatten_permutation_of_the_output():
    assert flatten_permutation(_model()) is None  # a dense follows the flatten: its weights are permuted instead
    spec = {"name": "flat", "layers": [{"type": "conv2d", "filters": 5, "kernel": [4, 2], "stride": [1, 2]},
                                       {"type": "flatten"}, {"type": "batchnorm"}, {"type": "softmax"}]}
    model = compile_model(spec, (1, 4, 4), 10)  # 5×1×2
    perm = flatten_permutation(model)
    x = np.random.default_rng(0).normal(size=(5, 1, 2))
    np.testing.assert_array_equal(x.transpose(1, 2, 0).reshape(-1)[perm], x.reshape(-1))


def test_no_flatten_means_no_output_permutation():
    """Global pooling ends in a per-channel vector, the same in both layouts."""
    spec = {"name": "gap", "layers": [{"type": "conv2d", "filters": 10, "kernel": 3}, {"type": "global_avgpool"},
                                      {"type": "softmax"}]}
    assert flatten_permutation(compile_model(spec, (1, 6, 6), 10)) is None


TF_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import cnnrun.backends.tensorflow  # TensorFlow, imported quietly
    import tensorflow as tf
    from cnnrun.layout import CHANNELS_LAST, from_canonical
    from cnnrun.spec import compile_model

    spec = {"name": "tf", "layers": [{"type": "conv2d", "filters": 3, "kernel": [3, 2], "stride": [2, 1]},
                                     {"type": "flatten"}, {"type": "dense", "units": 4}]}
    model = compile_model(spec, (2, 7, 5), 4)
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in model.weight_shapes().items()}
    x = rng.normal(size=(2, 2, 7, 5)).astype(np.float32)
    native = from_canonical(model, w, CHANNELS_LAST)
    y = tf.nn.conv2d(x.transpose(0, 2, 3, 1), native["conv2d_0/kernel"], (1, 2, 1, 1), "VALID")
    y = y + native["conv2d_0/bias"]
    flat = tf.reshape(y, (2, -1))
    out = (tf.matmul(flat, native["dense_2/kernel"]) + native["dense_2/bias"]).numpy()
    json.dump({"conv": y.numpy().transpose(0, 3, 1, 2).tolist(), "out": out.tolist()}, sys.stdout)
    """
)


@pytest.mark.slow
def test_converted_weights_drive_real_tensorflow_ops():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", TF_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    spec_model = compile_model(
        {"name": "tf", "layers": [{"type": "conv2d", "filters": 3, "kernel": [3, 2], "stride": [2, 1]},
                                  {"type": "flatten"}, {"type": "dense", "units": 4}]}, (2, 7, 5), 4)
    rng = np.random.default_rng(0)
    w = {k: rng.normal(size=s).astype(np.float32) for k, s in spec_model.weight_shapes().items()}
    x = rng.normal(size=(2, 2, 7, 5)).astype(np.float32)
    conv = conv_nchw(x, w["conv2d_0/kernel"], (2, 1)) + w["conv2d_0/bias"][None, :, None, None]
    out = conv.reshape(2, -1) @ w["dense_2/kernel"].T + w["dense_2/bias"]
    np.testing.assert_allclose(np.asarray(got["conv"]), conv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["out"]), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axes, native, fans", [("OIHW", "HWIO", (2 * 15, 3 * 15)), ("OI", "IO", (2, 3)),
                                                ("I", "I", (2, 1))])
def test_a_tensors_axes_give_its_channels_last_order_and_glorot_fans(axes, native, fans):
    """Layout and initialisation read nothing but the axes a layer type declares (cnnrun.spec.layers.Tensor)."""
    from cnnrun.layout import channels_last_axes
    from cnnrun.spec.layers import Tensor

    sizes = {"O": 3, "I": 2, "H": 3, "W": 5}
    assert channels_last_axes(axes) == native
    assert Tensor(axes, "glorot_uniform").fans(tuple(sizes[a] for a in axes)) == fans


@pytest.mark.parametrize("layout", [CHANNELS_FIRST, CHANNELS_LAST])
def test_a_tensor_held_reshaped_comes_back_in_the_declared_shape(layout):
    """A framework may hold a tensor in another shape with the same order of values (a depthwise kernel:
    (C·M, 1, H, W) canonical, (H, W, C, M) channels-last): reading it gives the spec's shape, not the framework's."""
    model = _model()
    weights = _random_weights(model)
    native = from_canonical(model, weights, layout)
    held = {name: value.reshape(-1) if value.ndim > 1 else value for name, value in native.items()}
    back = to_canonical(model, held, layout)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
