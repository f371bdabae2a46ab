"""ONNX export from the compiled spec and canonical weights alone: no training framework is imported.

The checkpoint's tensors are already in cnnrun's channels-first canonical layout, which is ONNX's, so one exporter
serves checkpoints from every framework. The graph (opset :data:`OPSET`):

- input ``images``: uint8 (N, H, W, C), what cnnrun's runners take; the graph casts, normalises with the
  checkpoint's mean and std as ``(x - mean) · (1 / std)`` and transposes to NCHW;
- outputs ``logits`` (float32 (N, classes), before any softmax, as a runner's ``predict_logits``) and
  ``probabilities`` (their softmax);
- metadata_props: ``cnnrun.class_names`` and ``cnnrun.input_shape`` (JSON) and the normalisation, so a predictor
  needs nothing but the file.

Padding is explicit per side (``pads`` attributes), so TensorFlow's uneven 'same' padding is kept as is; average
pooling uses ``count_include_pad=0`` (real cells only, cnnrun's definition); batchnorm is its inference formula
``(x - mean) · γ/√(var + ε) + β`` written out, the form every backend computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnrun import __version__
from cnnrun.checkpoint import Checkpoint
from cnnrun.export import model_metadata
from cnnrun.export.onnx_runtime import LOGITS
from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE

OPSET = 17
IR_VERSION = 8  # the IR of opset 17: older onnxruntime releases load the file too
INPUT, PROBABILITIES = "images", "probabilities"


class GraphBuilder:
    """Collects nodes and initializers; every tensor name is unique, derived from the canonical layer name."""

    def __init__(self, weights: Dict[str, np.ndarray]):
        self.weights = weights
        self.nodes: List = []
        self.initializers: List = []
        self._names: Dict[str, int] = {}

    def fresh(self, base: str) -> str:
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def constant(self, name: str, value: np.ndarray) -> str:
        name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def weight(self, layer: CompiledLayer, param: str) -> str:
        return self.constant(f"{layer.name}/{param}", self.weights[f"{layer.name}/{param}"])

    def node(self, op: str, inputs: List[str], name: str, **attributes) -> str:
        output = self.fresh(name)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _activation(g: GraphBuilder, fn: str, x: str, name: str) -> str:
    if fn == "linear":
        return x
    if fn == "elu":
        return g.node("Elu", [x], f"{name}/elu", alpha=ELU_ALPHA)
    if fn == "leaky_relu":
        return g.node("LeakyRelu", [x], f"{name}/leaky_relu", alpha=LEAKY_RELU_SLOPE)
    if fn == "relu6":
        zero, six = g.constant(f"{name}/zero", np.float32(0.0)), g.constant(f"{name}/six", np.float32(6.0))
        return g.node("Clip", [x, zero, six], f"{name}/relu6")
    if fn == "gelu":  # opset 17 has no Gelu: x·(1 + erf(x/√2))/2 written out
        scaled = g.node("Mul", [x, g.constant(f"{name}/inv_sqrt2", np.float32(1.0 / np.sqrt(2.0)))], f"{name}/gelu_in")
        one_plus = g.node("Add", [g.node("Erf", [scaled], f"{name}/erf"), g.constant(f"{name}/one", np.float32(1.0))],
                          f"{name}/gelu_cdf")
        half_x = g.node("Mul", [x, g.constant(f"{name}/half", np.float32(0.5))], f"{name}/half_x")
        return g.node("Mul", [half_x, one_plus], f"{name}/gelu")
    if fn == "swish":
        return g.node("Mul", [x, g.node("Sigmoid", [x], f"{name}/sigmoid")], f"{name}/swish")
    if fn == "hard_swish":
        return g.node("HardSwish", [x], f"{name}/hard_swish")  # x·max(0, min(1, x/6 + 1/2)) = x·relu6(x + 3)/6
    op = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[fn]
    return g.node(op, [x], f"{name}/{fn}")


def _onnx_pads(layer: CompiledLayer) -> List[int]:
    (top, bottom), (left, right) = layer.pads
    return [top, left, bottom, right]  # ONNX: all starts, then all ends


def _window_conv(g: GraphBuilder, layer: CompiledLayer, x: str, kernel: str, bias: bool, group: int,
                 name: str) -> str:
    """An ONNX Conv over the layer's window (its kernel in canonical layout is ONNX's (M, C/group, kh, kw))."""
    spec = layer.spec
    inputs = [x, g.weight(layer, kernel)] + ([g.weight(layer, "bias")] if bias else [])
    return g.node("Conv", inputs, name, kernel_shape=list(spec.kernel), strides=list(spec.stride),
                  dilations=list(spec.dilation), pads=_onnx_pads(layer), group=group)


def _conv(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    y = _window_conv(g, layer, x, "kernel", spec.bias, spec.groups, layer.name)
    return _activation(g, spec.activation, y, layer.name)


def _depthwise_conv(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    y = _window_conv(g, layer, x, "kernel", spec.bias, layer.in_shape[0], layer.name)
    return _activation(g, spec.activation, y, layer.name)


def _separable_conv(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    middle = _window_conv(g, layer, x, "depthwise_kernel", False, layer.in_shape[0], f"{layer.name}/depthwise")
    inputs = [middle, g.weight(layer, "pointwise_kernel")] + ([g.weight(layer, "bias")] if spec.bias else [])
    y = g.node("Conv", inputs, layer.name, kernel_shape=[1, 1])
    return _activation(g, spec.activation, y, layer.name)


def _upsample(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    """Resize by the integer factors: nearest takes cell ⌊i / factor⌋ ('asymmetric', 'floor'); bilinear uses
    half-pixel centres, clamped at the edges, as every backend."""
    scales = g.constant(f"{layer.name}/scales", np.array([1.0, 1.0, *layer.spec.size], np.float32))
    if layer.spec.interpolation == "nearest":
        return g.node("Resize", [x, "", scales], layer.name, mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return g.node("Resize", [x, "", scales], layer.name, mode="linear", coordinate_transformation_mode="half_pixel")


def _maxpool(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    # ONNX max pooling never picks a padded cell, as cnnrun's -inf padding.
    spec = layer.spec
    return g.node("MaxPool", [x], layer.name, kernel_shape=list(spec.size), strides=list(spec.strides),
                  pads=_onnx_pads(layer))


def _avgpool(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    return g.node("AveragePool", [x], layer.name, kernel_shape=list(spec.size), strides=list(spec.strides),
                  pads=_onnx_pads(layer), count_include_pad=0)


def _global_avgpool(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    pooled = g.node("GlobalAveragePool", [x], f"{layer.name}/pool")
    return g.node("Flatten", [pooled], layer.name, axis=1)


def _global_maxpool(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    pooled = g.node("GlobalMaxPool", [x], f"{layer.name}/pool")
    return g.node("Flatten", [pooled], layer.name, axis=1)


def _flatten(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    return g.node("Flatten", [x], layer.name, axis=1)  # NCHW → C·H·W order, the canonical one


def _dense(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    inputs = [x, g.weight(layer, "kernel")] + ([g.weight(layer, "bias")] if spec.bias else [])
    y = g.node("Gemm", inputs, layer.name, transB=1)  # canonical kernel (out, in): x · Wᵀ
    return _activation(g, spec.activation, y, layer.name)


def _batchnorm(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    spec = layer.spec
    trailing = (1, 1) if len(layer.in_shape) == 3 else ()  # broadcast over H, W for feature maps
    w = {p: g.weights[f"{layer.name}/{p}"].astype(np.float32) for p in ("gamma", "beta", "moving_mean",
                                                                        "moving_variance")}
    scale = w["gamma"] / np.sqrt(w["moving_variance"] + np.float32(spec.epsilon))
    shape = (-1, *trailing)
    centred = g.node("Sub", [x, g.constant(f"{layer.name}/moving_mean", w["moving_mean"].reshape(shape))],
                     f"{layer.name}/centre")
    scaled = g.node("Mul", [centred, g.constant(f"{layer.name}/scale", scale.reshape(shape))], f"{layer.name}/scale")
    return g.node("Add", [scaled, g.constant(f"{layer.name}/beta", w["beta"].reshape(shape))], layer.name)


def _residual(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    y = x
    for child in layer.body:
        y = build_layer(g, child, y)
    shortcut = build_layer(g, layer.shortcut, x) if layer.shortcut is not None else x
    total = g.node("Add", [y, shortcut], f"{layer.name}/add")
    return _activation(g, layer.spec.activation, total, layer.name)


def _identity(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    return x


# One builder per layer type, keyed like cnnrun.spec.LAYER_TYPES. Dropout is off at inference; softmax is the
# separate ``probabilities`` output, so ``logits`` stay the pre-softmax values every runner predicts.
BUILDERS: Dict[str, Callable[[GraphBuilder, CompiledLayer, str], str]] = {
    "conv2d": _conv,
    "depthwise_conv2d": _depthwise_conv,
    "separable_conv2d": _separable_conv,
    "maxpool": _maxpool,
    "avgpool": _avgpool,
    "global_avgpool": _global_avgpool,
    "global_maxpool": _global_maxpool,
    "upsample": _upsample,
    "flatten": _flatten,
    "dense": _dense,
    "dropout": _identity,
    "batchnorm": _batchnorm,
    "activation": lambda g, layer, x: _activation(g, layer.spec.fn, x, layer.name),
    "softmax": _identity,
    "residual": _residual,
}


def build_layer(g: GraphBuilder, layer: CompiledLayer, x: str) -> str:
    return BUILDERS[layer.type](g, layer, x)


def build_onnx(ckpt: Checkpoint, model: CompiledModel) -> onnx.ModelProto:
    """The checkpoint's model as an ``onnx.ModelProto``, checked by ``onnx.checker``."""
    g = GraphBuilder(ckpt.weights)
    c, h, w = model.input_shape
    mean = np.asarray(ckpt.mean, np.float32).reshape(1, 1, 1, c)
    inv_std = (np.float32(1.0) / np.asarray(ckpt.std, np.float32)).reshape(1, 1, 1, c)
    x = g.node("Cast", [INPUT], "input/float", to=TensorProto.FLOAT)
    x = g.node("Sub", [x, g.constant("input/mean", mean)], "input/centre")
    x = g.node("Mul", [x, g.constant("input/inv_std", inv_std)], "input/normalised")
    x = g.node("Transpose", [x], "input/nchw", perm=[0, 3, 1, 2])
    for layer in model.layers:
        x = build_layer(g, layer, x)
    g.nodes.append(helper.make_node("Identity", [x], [LOGITS], name=LOGITS))
    g.nodes.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name=PROBABILITIES, axis=1))
    classes = len(ckpt.class_names)
    graph = helper.make_graph(
        g.nodes,
        model.name,
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", h, w, c])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", classes])],
        initializer=g.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cnnrun",
                              producer_version=__version__, ir_version=IR_VERSION,
                              doc_string=f"cnnrun model {model.name}: uint8 NHWC images in, logits and "
                                         "probabilities out")
    helper.set_model_props(proto, model_metadata(ckpt, model))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write(ckpt: Checkpoint, model: CompiledModel, path: Path, options=None) -> None:
    """The export entry point (see :mod:`cnnrun.export`); ONNX needs no framework, so ``options`` is unused."""
    Path(path).write_bytes(build_onnx(ckpt, model).SerializeToString())
