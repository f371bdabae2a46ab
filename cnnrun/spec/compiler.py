"""Validate a model spec and infer every shape, parameter count and FLOP count, before any framework loads.

``compile_model`` returns a :class:`CompiledModel`, the one description every backend builds from: layers with
resolved names, shapes, explicit (before, after) padding per axis and canonical weight shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnnrun.errors import ConfigError, Problem
from cnnrun.spec.layers import (
    LAYER_TYPES,
    RESIDUAL_BODY_TYPES,
    AnyLayer,
    Conv2D,
    Flatten,
    LayerSpec,
    Residual,
    Shape,
    ShapeProblem,
    Tensor,
    _Window,
)
from cnnrun.spec.shapes import pad_amounts, real_cell_scale
from cnnrun.spec.validation import problems_from


class ModelSpec(BaseModel):
    """The ``model`` config group: a name and a list of layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="The model's name, used in run names.")
    description: Optional[str] = None
    layers: List[AnyLayer] = Field(min_length=1, description="The layers, first to last.")


@dataclass
class CompiledLayer:
    """One layer with everything a backend needs to build it and a summary needs to print it."""

    name: str  # canonical, unique: "conv2d_0", "residual_5/conv2d_1", "residual_5/shortcut"
    key: str  # where it came from in the config: "model.layers[5].layers[1]"
    spec: LayerSpec
    in_shape: Shape
    out_shape: Shape
    weights: Dict[str, Shape] = field(default_factory=dict)
    states: Dict[str, Shape] = field(default_factory=dict)
    flops: int = 0
    # Explicit zero/-inf padding ((top, bottom), (left, right)) for windows; None for other layers.
    pads: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
    # For a layer with tensors along its input features (dense, batchnorm) fed by a flatten: the C×H×W it was
    # flattened from (channels-last backends permute those tensors' I axis, see cnnrun.layout).
    flattened_from: Optional[Shape] = None
    body: List["CompiledLayer"] = field(default_factory=list)
    shortcut: Optional["CompiledLayer"] = None

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def params(self) -> int:
        return sum(_numel(s) for s in self.weights.values()) + sum(
            child.params for child in self.children()
        )

    @property
    def total_flops(self) -> int:
        return self.flops + sum(child.total_flops for child in self.children())

    @property
    def tensors(self) -> Dict[str, Tensor]:
        """Each of this layer's tensors (weights, then states) by name → its canonical axes and initialisation."""
        return {name: self.spec.tensor(name) for name in (*self.weights, *self.states)}

    def real_cell_scale(self):
        """For a padded window layer: its :func:`~cnnrun.spec.shapes.real_cell_scale` ((OH, OW) float32), the
        factor that turns an average over zero-padded windows into one over real cells; None when unpadded."""
        if self.pads is None or not any(sum(p) for p in self.pads):
            return None
        size, strides = self.spec._window()
        return real_cell_scale(self.in_shape[1:], size, strides, self.pads)

    def children(self) -> List["CompiledLayer"]:
        return self.body + ([self.shortcut] if self.shortcut else [])

    @property
    def same_padding_symmetric(self) -> bool:
        return self.pads is None or all(a == b for a, b in self.pads)


@dataclass
class CompiledModel:
    name: str
    input_shape: Shape
    num_classes: int
    layers: List[CompiledLayer]
    spec: Dict[str, Any]  # the resolved spec, as plain data, for checkpoints and logging

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].out_shape

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.total_flops for layer in self.layers)

    def walk(self) -> Iterator[CompiledLayer]:
        """Every layer, depth first, residual bodies and shortcuts included."""
        stack = list(reversed(self.layers))
        while stack:
            layer = stack.pop()
            yield layer
            stack.extend(reversed(layer.children()))

    def weight_shapes(self) -> Dict[str, Shape]:
        """Canonical name → shape of every tensor a checkpoint holds (trainable and running statistics)."""
        shapes: Dict[str, Shape] = {}
        for layer in self.walk():
            for kind in (layer.weights, layer.states):
                for wname, shape in kind.items():
                    shapes[f"{layer.name}/{wname}"] = shape
        return shapes

    @property
    def ends_with_softmax(self) -> bool:
        return self.layers[-1].type == "softmax"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fmt_shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape)


def compile_model(
    spec: Dict[str, Any],
    input_shape: Shape,
    num_classes: int,
    source: str = "model",
) -> CompiledModel:
    """Validate ``spec`` (the ``model`` config as plain data) for inputs of ``input_shape`` (C, H, W).

    Raises :class:`ConfigError` listing every problem found, each under its dotted key.
    """
    try:
        model = ModelSpec.model_validate(spec)
    except ValidationError as err:
        raise ConfigError(problems_from(err, "model", ModelSpec, LAYER_TYPES), source) from None

    problems: List[Problem] = []
    _check_structure(model.layers, "model.layers", problems, top_level=True)
    if problems:
        raise ConfigError(problems, source)

    trail = [fmt_shape(input_shape)]
    layers = _compile_list(model.layers, tuple(input_shape), "model.layers", "", trail, problems)
    if not problems:
        out = layers[-1].out_shape
        if len(out) != 1 or out[0] != num_classes:
            last = next(l for l in reversed(layers) if l.type not in ("softmax", "dropout", "activation"))
            problems.append(
                Problem(
                    last.key,
                    f"the model outputs {fmt_shape(out)} values but the dataset has {num_classes} classes; "
                    "end with {type: dense, units: ${dataset.num_classes}}",
                )
            )
    if problems:
        raise ConfigError(problems, source)
    resolved = model.model_dump(mode="json", exclude_none=True)
    return CompiledModel(model.name, tuple(input_shape), num_classes, layers, resolved)


def _check_structure(layers: Sequence[LayerSpec], key: str, problems: List[Problem], top_level: bool) -> None:
    """Rules about where a layer may stand, independent of shapes."""
    for i, layer in enumerate(layers):
        here = f"{key}[{i}]"
        if layer.type == "softmax" and (not top_level or i != len(layers) - 1):
            problems.append(Problem(here, "softmax must be the last layer of the model"))
        if not top_level and layer.type not in RESIDUAL_BODY_TYPES:
            allowed = ", ".join(RESIDUAL_BODY_TYPES)
            problems.append(Problem(here, f"{layer.type} cannot stand inside a residual block; allowed: {allowed}"))
        if isinstance(layer, Residual):
            _check_structure(layer.layers, f"{here}.layers", problems, top_level=False)
    names = [l.name for l in layers if l.name]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem(key, f"layer name '{dup}' is used more than once"))


def _compile_list(
    specs: Sequence[LayerSpec],
    in_shape: Shape,
    key: str,
    prefix: str,
    trail: List[str],
    problems: List[Problem],
) -> List[CompiledLayer]:
    compiled: List[CompiledLayer] = []
    shape = in_shape
    flattened_from: Optional[Shape] = None
    for i, spec in enumerate(specs):
        here = f"{key}[{i}]"
        name = prefix + (spec.name or f"{spec.type}_{i}")
        try:
            layer = _compile_one(spec, shape, here, name, trail, problems)
        except ShapeProblem as err:
            problems.append(Problem(here, f"({spec.type}) {err}; shapes so far {' -> '.join(trail)}"))
            return compiled
        if layer is None:
            return compiled
        if isinstance(spec, Flatten) and len(shape) == 3:
            flattened_from = shape
        elif flattened_from is not None:
            if any("I" in tensor.axes for tensor in layer.tensors.values()):
                layer.flattened_from = flattened_from
            if not spec.keeps_feature_order:
                flattened_from = None
        compiled.append(layer)
        shape = layer.out_shape
        trail.append(fmt_shape(shape))
    return compiled


def _compile_one(
    spec: LayerSpec, in_shape: Shape, key: str, name: str, trail: List[str], problems: List[Problem]
) -> Optional[CompiledLayer]:
    out_shape = spec.output_shape(in_shape)
    if any(d <= 0 for d in out_shape):
        raise ShapeProblem(f"output would be {fmt_shape(out_shape)} for an input of {fmt_shape(in_shape)}")
    layer = CompiledLayer(
        name=name,
        key=key,
        spec=spec,
        in_shape=in_shape,
        out_shape=out_shape,
        weights=spec.weight_shapes(in_shape),
        states=spec.state_shapes(in_shape),
        flops=spec.flops(in_shape, out_shape),
    )
    if isinstance(spec, _Window):
        (kh, kw), (sh, sw) = spec._window()
        ph, pw = (spec.padding, spec.padding) if isinstance(spec.padding, str) else spec.padding
        layer.pads = (pad_amounts(in_shape[1], kh, sh, ph), pad_amounts(in_shape[2], kw, sw, pw))
    if isinstance(spec, Residual):
        return _compile_residual(layer, spec, trail, problems)
    return layer


def _compile_residual(
    layer: CompiledLayer, spec: Residual, trail: List[str], problems: List[Problem]
) -> Optional[CompiledLayer]:
    in_shape = layer.in_shape
    if len(in_shape) != 3:
        raise ShapeProblem("residual needs a C×H×W feature map")
    inner_trail = list(trail)
    body = _compile_list(spec.layers, in_shape, f"{layer.key}.layers", f"{layer.name}/", inner_trail, problems)
    if len(body) != len(spec.layers):
        return None  # the body reported its own problem
    out_shape = body[-1].out_shape
    layer.body, layer.out_shape, layer.flops = body, out_shape, _numel(out_shape)
    if out_shape == in_shape:
        return layer
    # The shortcut projects with a 1×1 conv whose stride is the body's total stride; it must land on the same H×W.
    stride = _strides_of(layer)
    projection = Conv2D(filters=out_shape[0], kernel=1, stride=stride, padding="valid")
    projected = projection.output_shape(in_shape)
    if projected != out_shape:
        raise ShapeProblem(
            f"the block maps {fmt_shape(in_shape)} to {fmt_shape(out_shape)}, which a 1×1 stride "
            f"{stride[0]}×{stride[1]} shortcut cannot match ({fmt_shape(projected)}); use padding: same in the block"
        )
    layer.shortcut = _compile_one(projection, in_shape, f"{layer.key}.shortcut", f"{layer.name}/shortcut", trail, problems)
    return layer


def _strides_of(layer: CompiledLayer) -> Tuple[int, int]:
    spec = layer.spec
    if isinstance(spec, Conv2D):
        return spec.stride
    if isinstance(spec, _Window):
        return spec._window()[1]
    if isinstance(spec, Residual):
        total = [1, 1]
        for inner in layer.body:
            for axis, s in enumerate(_strides_of(inner)):
                total[axis] *= s
        return (total[0], total[1])
    return (1, 1)
