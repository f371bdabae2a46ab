"""Specs that exercise every padding and stride rule; shared by the backend and equivalence tests."""

import re
from typing import Dict, Optional, Tuple

STRESS_INPUT = (3, 27, 29)

STRESS = {
    "name": "stress",
    "layers": [
        {"type": "conv2d", "filters": 4, "kernel": 4, "stride": 2, "padding": "same", "activation": "relu"},
        {"type": "conv2d", "filters": 5, "kernel": 3, "stride": 2, "padding": "same", "activation": "elu"},
        {"type": "avgpool", "size": 3, "stride": 1, "padding": "same"},
        {"type": "maxpool", "size": 3, "stride": 2, "padding": "same"},
        {"type": "conv2d", "filters": 6, "kernel": [3, 2], "stride": [1, 2], "padding": [1, 0], "activation": "tanh"},
        {"type": "batchnorm", "momentum": 0.9, "epsilon": 0.001},
        {"type": "avgpool", "size": 2, "stride": 3, "padding": "same"},
        {"type": "residual", "activation": "leaky_relu", "layers": [
            {"type": "conv2d", "filters": 8, "kernel": 2, "stride": 2, "padding": "same", "bias": False},
            {"type": "batchnorm"},
            {"type": "activation", "fn": "sigmoid"},
        ]},
        {"type": "dropout", "rate": 0.25},
        {"type": "flatten"},
        {"type": "batchnorm"},
        {"type": "dense", "units": 7, "activation": "relu"},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}

# Even input, 3×3 stride-2 'same' pooling: uneven padding (0 before, 1 after) for both poolings.
POOLING_INPUT = (2, 8, 10)
POOLING = {
    "name": "pooling",
    "layers": [
        {"type": "avgpool", "size": 3, "stride": 2, "padding": "same"},
        {"type": "maxpool", "size": 3, "stride": 2, "padding": "same"},
        {"type": "conv2d", "filters": 3, "kernel": 2, "padding": 1},
        {"type": "global_avgpool"},
        {"type": "dense", "units": 10},
    ],
}

# Every layer type and option added for mobile and dense-prediction networks, on an odd-sized RGB input:
# groups with a dilated 'same' kernel, depthwise with a depth multiplier (stride-2 'same' pads (0, 1) on one axis,
# 'valid' with [2, 3] stride, no bias), separable convs (dilated [2, 1] with int padding, bias false), a strided
# depthwise body with its projection, bilinear and nearest upsampling with unequal factors, global max pooling,
# and every new activation in conv, dense, residual and activation layers (silu under its other name).
MOBILE_INPUT = (3, 17, 15)
MOBILE = {
    "name": "mobile",
    "layers": [
        {"type": "conv2d", "filters": 8, "kernel": 3, "stride": 2, "padding": "same", "bias": False,
         "activation": "relu6"},
        {"type": "batchnorm", "momentum": 0.9},
        {"type": "depthwise_conv2d", "kernel": 3, "padding": "same", "depth_multiplier": 2,
         "activation": "hard_swish"},
        {"type": "conv2d", "filters": 12, "kernel": 3, "groups": 4, "dilation": 2, "padding": "same",
         "activation": "gelu"},
        {"type": "residual", "activation": "swish", "layers": [
            {"type": "depthwise_conv2d", "kernel": [3, 2], "stride": 2, "padding": "same", "bias": False},
            {"type": "batchnorm"},
            {"type": "separable_conv2d", "filters": 16, "kernel": 3, "padding": "same", "depth_multiplier": 2,
             "activation": "silu"},
        ]},
        {"type": "upsample", "size": 2, "interpolation": "bilinear"},
        {"type": "separable_conv2d", "filters": 10, "kernel": 3, "dilation": [2, 1], "padding": 1, "bias": False,
         "activation": "hard_swish"},
        {"type": "upsample", "size": [1, 2], "interpolation": "nearest"},
        {"type": "depthwise_conv2d", "kernel": 2, "stride": [2, 3], "activation": "gelu"},
        {"type": "activation", "fn": "relu6"},
        {"type": "global_maxpool"},
        {"type": "dense", "units": 12, "activation": "gelu"},
        {"type": "dense", "units": 10},
        {"type": "softmax"},
    ],
}


def without_dropout(spec: Dict) -> Dict:
    """The same spec (same layer names) with every dropout rate 0, for deterministic training steps."""
    def strip(layers):
        out = []
        for layer in layers:
            layer = dict(layer)
            if layer["type"] == "dropout":
                layer["rate"] = 0.0
            if layer["type"] == "residual":
                layer["layers"] = strip(layer["layers"])
            out.append(layer)
        return out

    return {**spec, "layers": strip(spec["layers"])}


def first_empty_layer(spec: Dict, input_shape) -> Optional[Tuple[int, str]]:
    """(index, type) of the first top-level conv/pool layer whose output a textbook size rule makes empty, or None.

    An oracle independent of the compiler for grids of plain layers (every window layer states its stride):
    'valid' floor((n - k) / s) + 1, 'same' ceil(n / s), int p floor((n + 2p - k) / s) + 1, nothing when the
    window is larger than the padded input.
    """
    sizes = list(input_shape[1:])
    for index, layer in enumerate(spec["layers"]):
        if layer["type"] not in ("conv2d", "maxpool", "avgpool"):
            continue
        kernel, stride, padding = layer.get("kernel", layer.get("size")), layer["stride"], layer.get("padding")
        for axis, n in enumerate(sizes):
            if padding == "same":
                sizes[axis] = -(-n // stride)
            else:
                pad = 0 if padding in (None, "valid") else padding
                sizes[axis] = (n + 2 * pad - kernel) // stride + 1 if n + 2 * pad >= kernel else 0
        if min(sizes) <= 0:
            return index, layer["type"]
    return None


def refused(spec: Dict, input_shape) -> bool:
    """Whether the oracle above says ``spec`` has an empty output; if so, assert that the compiler refuses it,
    naming that layer, so a grid test checks the refusal instead of skipping the case."""
    import pytest

    from cnnrun.errors import ConfigError
    from cnnrun.spec import compile_model

    empty = first_empty_layer(spec, input_shape)
    if empty is None:
        return False
    index, kind = empty
    with pytest.raises(ConfigError, match=re.escape(f"model.layers[{index}]: ({kind}) output would be")):
        compile_model(spec, input_shape, 10)
    return True
