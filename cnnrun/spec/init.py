"""Initial weights drawn by cnnrun, in canonical layout, so every framework starts from the same numbers.

Kernels: Glorot-uniform (Keras's default) over each layer's own fans (``LayerSpec.kernel_fans``: a grouped or
depthwise kernel connects fewer channels than its shape alone says); biases and batchnorm beta: 0; gamma and
running variance: 1.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from cnnrun.spec.compiler import CompiledModel


def initial_weights(model: CompiledModel, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7919])  # 7919 keeps weight draws apart from the data-order stream
    weights: Dict[str, np.ndarray] = {}
    for layer in model.walk():  # the order of model.weight_shapes(): each draw lands where it always did
        fans = layer.spec.kernel_fans(layer.in_shape)
        for param, shape in {**layer.weights, **layer.states}.items():
            name = f"{layer.name}/{param}"
            if param in fans:
                fan_in, fan_out = fans[param]
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
            elif param in ("gamma", "moving_variance"):
                weights[name] = np.ones(shape, np.float32)
            else:
                weights[name] = np.zeros(shape, np.float32)
    return weights
