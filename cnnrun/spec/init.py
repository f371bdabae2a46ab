"""Initial weights drawn by cnnrun, in canonical layout, so every framework starts from the same numbers.

Kernels: Glorot-uniform (Keras's default); biases and batchnorm beta: 0; gamma and running variance: 1.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from cnnrun.spec.compiler import CompiledModel


def initial_weights(model: CompiledModel, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7919])  # 7919 keeps weight draws apart from the data-order stream
    weights: Dict[str, np.ndarray] = {}
    for name, shape in model.weight_shapes().items():
        param = name.rsplit("/", 1)[1]
        if param == "kernel":
            receptive = int(np.prod(shape[2:])) if len(shape) == 4 else 1
            fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weights[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        elif param in ("gamma", "moving_variance"):
            weights[name] = np.ones(shape, np.float32)
        else:
            weights[name] = np.zeros(shape, np.float32)
    return weights
