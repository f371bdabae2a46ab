"""A slow, obvious NumPy forward pass with cnnrun's (TensorFlow's) semantics: the oracle backends are checked
against. Channels-first, float64, inference mode (dropout off, batchnorm on running statistics)."""

from __future__ import annotations

import math

import numpy as np

from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE

_erf = np.vectorize(math.erf)


def activation(x, name):
    return {
        "linear": lambda v: v,
        "relu": lambda v: np.maximum(v, 0),
        "tanh": np.tanh,
        "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
        "elu": lambda v: np.where(v > 0, v, ELU_ALPHA * (np.exp(np.minimum(v, 0)) - 1)),
        "leaky_relu": lambda v: np.where(v > 0, v, LEAKY_RELU_SLOPE * v),
        "relu6": lambda v: np.clip(v, 0, 6),
        "gelu": lambda v: v * 0.5 * (1 + _erf(v / math.sqrt(2))),
        "swish": lambda v: v / (1 + np.exp(-v)),
        "hard_swish": lambda v: v * np.clip(v + 3, 0, 6) / 6,
    }[name](x)


def _windows(x, layer: CompiledLayer, kernel, stride, fill, dilation=(1, 1)):
    """(N, C, OH, OW, KH, KW) windows of x padded with `fill` by the layer's explicit pads; a dilated window
    takes every dilation-th cell over its span."""
    (top, bottom), (left, right) = layer.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    oh, ow = layer.out_shape[1], layer.out_shape[2]
    out = np.empty(x.shape[:2] + (oh, ow, kh, kw), x.dtype)
    for i in range(oh):
        for j in range(ow):
            rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
            out[:, :, i, j] = x[:, :, rows, slice(j * sw, j * sw + dw * (kw - 1) + 1, dw)]
    return out


def _grouped_conv(x, layer: CompiledLayer, kernel, groups):
    """Each group of input channels convolved with its own slice of (out, in/groups, kh, kw) kernels."""
    spec = layer.spec
    win = _windows(x, layer, spec.kernel, spec.stride, 0.0, spec.dilation)
    per_in, per_out = x.shape[1] // groups, kernel.shape[0] // groups
    return np.concatenate([
        np.einsum("ncijhw,ochw->noij", win[:, g * per_in:(g + 1) * per_in], kernel[g * per_out:(g + 1) * per_out])
        for g in range(groups)
    ], axis=1)


def _upsample(x, size, interpolation):
    """Nearest: cell ⌊i / s⌋. Bilinear: output i samples (i + 0.5)/s − 0.5, clamped to the edge cells."""
    for axis, s in ((2, size[0]), (3, size[1])):
        n = x.shape[axis]
        out = np.arange(n * s)
        if interpolation == "nearest":
            x = np.take(x, out // s, axis=axis)
            continue
        src = np.clip((out + 0.5) / s - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        frac = (src - low).reshape([-1 if a == axis else 1 for a in range(4)])
        x = np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
    return x


def forward_layer(x, layer: CompiledLayer, w):
    spec, t = layer.spec, layer.type
    if t in ("conv2d", "depthwise_conv2d", "separable_conv2d"):
        if t == "separable_conv2d":
            middle = _grouped_conv(x, layer, w[f"{layer.name}/depthwise_kernel"], x.shape[1])
            y = np.einsum("ncij,oc->noij", middle, w[f"{layer.name}/pointwise_kernel"][:, :, 0, 0])
        else:
            groups = spec.groups if t == "conv2d" else x.shape[1]
            y = _grouped_conv(x, layer, w[f"{layer.name}/kernel"], groups)
        if spec.bias:
            y = y + w[f"{layer.name}/bias"][None, :, None, None]
        return activation(y, spec.activation)
    if t == "upsample":
        return _upsample(x, spec.size, spec.interpolation)
    if t == "global_maxpool":
        return x.max(axis=(2, 3))
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
        shortcut = forward_layer(x, layer.shortcut, w) if layer.shortcut else x
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
