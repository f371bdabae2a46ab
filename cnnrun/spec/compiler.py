"""Validate a model spec and infer every shape, parameter count and FLOP count, before any framework loads.

``compile_model`` returns a :class:`CompiledModel`, the one description every backend builds from: layers with
resolved names, shapes, explicit (before, after) padding per axis and canonical weight shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnnrun.errors import ConfigError, Problem
from cnnrun.spec.expand import Entry, expand
from cnnrun.spec.layers import (
    RESIDUAL_BODY_TYPES,
    SPEC_TYPES,
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

    name: str  # canonical, unique: "conv2d_0", "residual_5/conv2d_1", "residual_5/shortcut", "stage2_0/residual_0"
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
    # A residual block's shortcut layers, in order; empty for the identity.
    shortcut: List["CompiledLayer"] = field(default_factory=list)

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
        return self.body + self.shortcut

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

    @property
    def statistics(self) -> int:
        """Non-trainable values a checkpoint holds: batchnorm running means and variances."""
        return sum(_numel(s) for layer in self.walk() for s in layer.states.values())

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
        raise ConfigError(problems_from(err, "model", ModelSpec, SPEC_TYPES), source) from None

    problems: List[Problem] = []
    entries = expand(model.layers, "model.layers", "", problems)
    if not problems:
        _check_structure(entries, problems, top_level=True)
    if problems:
        raise ConfigError(_once(problems), source)

    trail = [fmt_shape(input_shape)]
    layers = _compile_list(entries, tuple(input_shape), trail, problems)
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
        raise ConfigError(_once(problems), source)
    resolved = model.model_dump(mode="json", exclude_none=True)
    return CompiledModel(model.name, tuple(input_shape), num_classes, layers, resolved)


def _once(problems: List[Problem]) -> List[Problem]:
    """Each problem once: the repetitions of a repeat share their config keys, and so their problems."""
    return list(dict.fromkeys(problems))


def _check_structure(entries: Sequence[Entry], problems: List[Problem], top_level: bool) -> None:
    """Rules about where a layer may stand, independent of shapes."""
    for i, entry in enumerate(entries):
        kind = entry.spec.type
        if kind == "softmax" and (not top_level or i != len(entries) - 1):
            problems.append(Problem(entry.key, "softmax must be the last layer of the model"))
        if not top_level and kind not in RESIDUAL_BODY_TYPES:
            allowed = ", ".join(RESIDUAL_BODY_TYPES)
            problems.append(Problem(entry.key, f"{kind} cannot stand inside a residual block; allowed: {allowed}"))
        for inner in (entry.body, entry.shortcut):
            if inner:
                _check_structure(inner, problems, top_level=False)


def _compile_list(
    entries: Sequence[Entry], in_shape: Shape, trail: List[str], problems: List[Problem]
) -> Optional[List[CompiledLayer]]:
    """The entries compiled in order from ``in_shape``, or None when one of them is a problem (reported)."""
    compiled: List[CompiledLayer] = []
    shape = in_shape
    flattened_from: Optional[Shape] = None
    for entry in entries:
        spec = entry.spec
        try:
            layer = _compile_one(entry, shape, trail, problems)
        except ShapeProblem as err:
            what = f"{spec.type}, {entry.repetition}" if entry.repetition else spec.type
            problems.append(Problem(entry.key, f"({what}) {err}; shapes so far {' -> '.join(trail)}"))
            return None
        if layer is None:
            return None
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


def _compile_one(entry: Entry, in_shape: Shape, trail: List[str], problems: List[Problem]) -> Optional[CompiledLayer]:
    spec = entry.spec
    out_shape = spec.output_shape(in_shape)
    if any(d <= 0 for d in out_shape):
        raise ShapeProblem(f"output would be {fmt_shape(out_shape)} for an input of {fmt_shape(in_shape)}")
    layer = CompiledLayer(
        name=entry.name,
        key=entry.key,
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
        return _compile_residual(layer, entry, trail, problems)
    return layer


def _compile_residual(
    layer: CompiledLayer, entry: Entry, trail: List[str], problems: List[Problem]
) -> Optional[CompiledLayer]:
    in_shape = layer.in_shape
    if len(in_shape) != 3:
        raise ShapeProblem("residual needs a C×H×W feature map")
    body = _compile_list(entry.body, in_shape, list(trail), problems)
    if body is None:
        return None  # the body reported its own problem
    out_shape = body[-1].out_shape
    layer.body, layer.out_shape, layer.flops = body, out_shape, _numel(out_shape)
    if entry.shortcut is not None:
        return _explicit_shortcut(layer, entry, trail, problems)
    if out_shape == in_shape:
        return layer
    # The shortcut projects with a 1×1 conv whose stride is the body's total stride; it must land on the same H×W.
    stride = _strides_of(layer)
    projection = Conv2D(filters=out_shape[0], kernel=1, stride=stride, padding="valid")
    projected = projection.output_shape(in_shape)
    if projected != out_shape:
        raise ShapeProblem(
            f"the block maps {fmt_shape(in_shape)} to {fmt_shape(out_shape)}, which a 1×1 stride "
            f"{stride[0]}×{stride[1]} shortcut cannot match ({fmt_shape(projected)}); use padding: same in the "
            "block, or give the shortcut's layers (shortcut: [...])"
        )
    auto = Entry(projection, f"{layer.name}/shortcut", f"{layer.key}.shortcut", entry.repetition)
    layer.shortcut = [_compile_one(auto, in_shape, trail, problems)]
    return layer


def _explicit_shortcut(
    layer: CompiledLayer, entry: Entry, trail: List[str], problems: List[Problem]
) -> Optional[CompiledLayer]:
    """The shortcut's own layers ([] = the identity); their output is added to the body's, so the shapes agree."""
    shortcut = _compile_list(entry.shortcut, layer.in_shape, list(trail), problems)
    if shortcut is None:
        return None
    got = shortcut[-1].out_shape if shortcut else layer.in_shape
    if got != layer.out_shape:
        what = "shortcut: [] is the identity, which gives" if not shortcut else "the shortcut gives"
        problems.append(Problem(
            f"{entry.key}.shortcut",
            f"{what} {fmt_shape(got)} but the block's layers give {fmt_shape(layer.out_shape)}; the two are added, "
            "so their shapes must be equal" + ("" if shortcut else
                                                 " (give a projection, e.g. a 1×1 conv with the body's stride)"),
        ))
        return None
    layer.shortcut = shortcut
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
