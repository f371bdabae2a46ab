"""Initial weights drawn by cnnrun, in canonical layout, so every framework starts from the same numbers.

Each tensor is initialised as its layer type declares (``TENSORS`` in :mod:`cnnrun.spec.layers`): kernels
Glorot-uniform (Keras's default) over the fans of their canonical axes (a grouped or depthwise
kernel's layer narrows them: ``LayerSpec.fans``); biases and batchnorm beta: 0; gamma and
running variance: 1.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from cnnrun.spec.compiler import CompiledModel
from cnnrun.spec.layers import Tensor


def initial_weights(model: CompiledModel, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7919])  # 7919 keeps weight draws apart from the data-order stream
    weights: Dict[str, np.ndarray] = {}
    for layer in model.walk():  # the order of model.weight_shapes(): the draws follow it
        for param, tensor in layer.tensors.items():
            shape = {**layer.weights, **layer.states}[param]
            weights[f"{layer.name}/{param}"] = _initial(tensor, shape, layer.spec.fans(param, shape), rng)
    return weights


def _initial(tensor: Tensor, shape, fans, rng) -> np.ndarray:
    if tensor.init == "glorot_uniform":
        fan_in, fan_out = fans
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=shape).astype(np.float32)
    if tensor.init == "ones":
        return np.ones(shape, np.float32)
    if tensor.init == "zeros":
        return np.zeros(shape, np.float32)
    raise ValueError(f"unknown initialisation {tensor.init!r}")
