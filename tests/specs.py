"""Specs that exercise every padding and stride rule; shared by the backend and equivalence tests."""

from typing import Dict

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
