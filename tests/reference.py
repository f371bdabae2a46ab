"""A slow, obvious NumPy forward pass with cnnrun's (TensorFlow's) semantics: the oracle backends are checked
against. Channels-first, float64, inference mode (dropout off, batchnorm on running statistics)."""

from __future__ import annotations

import numpy as np

from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE


def activation(x, name):
    return {
        "linear": lambda v: v,
        "relu": lambda v: np.maximum(v, 0),
        "tanh": np.tanh,
        "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
        "elu": lambda v: np.where(v > 0, v, ELU_ALPHA * (np.exp(np.minimum(v, 0)) - 1)),
        "leaky_relu": lambda v: np.where(v > 0, v, LEAKY_RELU_SLOPE * v),
    }[name](x)


def _windows(x, layer: CompiledLayer, kernel, stride, fill):
    """(N, C, OH, OW, KH, KW) windows of x padded with `fill` by the layer's explicit pads."""
    (top, bottom), (left, right) = layer.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    kh, kw = kernel
    sh, sw = stride
    oh, ow = layer.out_shape[1], layer.out_shape[2]
    out = np.empty(x.shape[:2] + (oh, ow, kh, kw), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
    return out


def forward_layer(x, layer: CompiledLayer, w):
    spec, t = layer.spec, layer.type
    if t == "conv2d":
        win = _windows(x, layer, spec.kernel, spec.stride, 0.0)
        y = np.einsum("ncijhw,ochw->noij", win, w[f"{layer.name}/kernel"])
        if spec.bias:
            y = y + w[f"{layer.name}/bias"][None, :, None, None]
        return activation(y, spec.activation)
    if t == "maxpool":
        return _windows(x, layer, spec.size, spec.strides, -np.inf).max(axis=(4, 5))
    if t == "avgpool":
        total = _windows(x, layer, spec.size, spec.strides, 0.0).sum(axis=(4, 5))
        ones = np.ones((1, 1) + x.shape[2:])
        counts = _windows(ones, layer, spec.size, spec.strides, 0.0).sum(axis=(4, 5))
        return total / counts
    if t == "global_avgpool":
        return x.mean(axis=(2, 3))
    if t == "flatten":
        return x.reshape(len(x), -1)
    if t == "dense":
        y = x @ w[f"{layer.name}/kernel"].T
        if spec.bias:
            y = y + w[f"{layer.name}/bias"]
        return activation(y, spec.activation)
    if t in ("dropout", "softmax"):
        return x  # inference; softmax is applied to logits outside
    if t == "batchnorm":
        shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
        get = lambda p: w[f"{layer.name}/{p}"].reshape(shape)
        return (x - get("moving_mean")) / np.sqrt(get("moving_variance") + spec.epsilon) * get("gamma") + get("beta")
    if t == "activation":
        return activation(x, spec.fn)
    if t == "residual":
        y = x
        for child in layer.body:
            y = forward_layer(y, child, w)
        shortcut = x
        for child in layer.shortcut:
            shortcut = forward_layer(shortcut, child, w)
        return activation(y + shortcut, spec.activation)
    raise NotImplementedError(t)


def reference_logits(model: CompiledModel, weights, images_nchw: np.ndarray) -> np.ndarray:
    x = images_nchw.astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    for layer in model.layers:
        x = forward_layer(x, layer, w)
    return x


def random_weights(model: CompiledModel, seed: int):
    """Non-trivial weights: random kernels, biases, batchnorm statistics far from the identity."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in model.weight_shapes().items():
        if name.endswith("moving_variance"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif name.endswith("gamma"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 4
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan)).astype(np.float32)
    return out
