"""Typed layer specs: everything cnnrun knows about a layer type, in one class per type.

A layer type is one class here: its fields and checks, ``output_shape``, ``weight_shapes``/``state_shapes`` with
each tensor's canonical axes and initialisation (``TENSORS``), ``flops``, and whether it may stand in a residual
body (``residual_body``) or passes a flattened vector's feature order through (``keeps_feature_order``). Defining
the class registers it: ``LAYER_TYPES``, ``AnyLayer`` and ``RESIDUAL_BODY_TYPES`` are derived from the classes,
initialisation (:mod:`cnnrun.spec.init`) and the checkpoint layout (:mod:`cnnrun.layout`) from ``TENSORS``. Each
backend then needs one builder for the type; ``tests/backends`` fails for a forgotten builder.

Shapes are per image, channels first: ``(C, H, W)`` for feature maps, ``(F,)`` for vectors. Weight shapes are in
cnnrun's canonical layout (PyTorch's): conv kernels OIHW, a grouped conv's (out, in / groups, kh, kw), a depthwise
kernel (C·multiplier, 1, kh, kw) with output channel c·multiplier + j drawn from input channel c, dense kernels
(out, in), a flattened vector in C·H·W order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cnnrun.errors import did_you_mean, one_of
from cnnrun.spec.shapes import empty_window, output_size

Shape = Tuple[int, ...]
Pair = Tuple[int, int]
# relu6: min(max(x, 0), 6). gelu: the exact form x·Φ(x) = x·(1 + erf(x/√2))/2, never the tanh approximation.
# swish: x·sigmoid(x) (β = 1), also accepted as silu. hard_swish: x·relu6(x + 3)/6, MobileNetV3's definition.
ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid", "elu", "leaky_relu", "relu6", "gelu", "swish", "hard_swish")
ACTIVATION_ALIASES = {"silu": "swish"}  # other names for the same function: the spec keeps the one above
LEAKY_RELU_SLOPE = 0.2  # tf.nn.leaky_relu's default; every backend uses this one value
ELU_ALPHA = 1.0
LAYER_TYPES: Dict[str, type] = {}  # YAML ``type`` → spec class; filled as the classes below are defined


@dataclass(frozen=True)
class Tensor:
    """How one of a layer's tensors is laid out and initialised.

    ``axes``: the canonical axes, one letter each: ``O`` output channels or units, ``I`` input channels or
    features (the axis a flattened feature map indexes in C·H·W order), ``H``/``W`` kernel rows and columns.
    Channels-last frameworks hold the same axes in ``HWIO`` order (see :mod:`cnnrun.layout`), possibly reshaped
    (a depthwise kernel, canonical (C·M, 1, H, W), is (H, W, C, M) there: the same order of values). Glorot's
    fans are ``I``·H·W and ``O``·H·W unless the layer's :meth:`LayerSpec.fans` says otherwise (grouped and
    depthwise kernels). ``init``: ``glorot_uniform``, ``zeros`` or ``ones``.
    """

    axes: str
    init: str

    def fans(self, shape: Shape) -> Tuple[int, int]:
        """(fan_in, fan_out) of a tensor of ``shape`` in canonical layout."""
        sizes = dict(zip(self.axes, shape))
        receptive = sizes.get("H", 1) * sizes.get("W", 1)
        return sizes.get("I", 1) * receptive, sizes.get("O", 1) * receptive


CONV_KERNEL = Tensor("OIHW", "glorot_uniform")
DENSE_KERNEL = Tensor("OI", "glorot_uniform")
BIAS = Tensor("O", "zeros")
FEATURE_SCALE = Tensor("I", "ones")  # per input feature: batchnorm's gamma and running variance
FEATURE_SHIFT = Tensor("I", "zeros")  # batchnorm's beta and running mean
INTERPOLATIONS = ("nearest", "bilinear")


class ShapeProblem(ValueError):
    """A layer cannot take the shape it is given; the compiler adds which layer and the shapes so far."""


def _pair(value: Any, what: str, minimum: int) -> Pair:
    """int-or-[h, w] → (h, w), checked once here so backends only ever see pairs."""
    items = list(value) if isinstance(value, (list, tuple)) else [value, value]
    ok = len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in items)
    if not ok:
        raise ValueError(f"expected an int >= {minimum} or [h, w] of such ints for {what}; received {value!r}")
    return (items[0], items[1])


def _padding(value: Any) -> Union[str, Pair]:
    if value in ("valid", "same"):
        return value
    try:
        return _pair(value, "padding", 0)
    except ValueError:
        hint = did_you_mean(value, ("valid", "same")) if isinstance(value, str) else ""
        raise ValueError(f"expected 'valid', 'same', an int >= 0 or [h, w]; received {value!r}{hint}") from None


def _activation(value: Any) -> str:
    if value is None:
        return "linear"
    if isinstance(value, str) and value in ACTIVATION_ALIASES:
        return ACTIVATION_ALIASES[value]
    if value not in ACTIVATIONS:
        names = (*ACTIVATIONS, *ACTIVATION_ALIASES)
        raise ValueError(f"expected {one_of(names)}; received {value!r}{did_you_mean(value, names)}")
    return value


def _require_3d(in_shape: Shape, kind: str) -> None:
    if len(in_shape) != 3:
        raise ShapeProblem(f"needs a C×H×W feature map; received a vector of {in_shape[0]} features")


class LayerSpec(BaseModel):
    """Fields and rules every layer shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Optional[str] = Field(default=None, description="Optional readable name; defaults to <type>_<index>.")

    # Every tensor ``weight_shapes`` or ``state_shapes`` may return, by name: its canonical axes and initialisation.
    TENSORS: ClassVar[Dict[str, Tensor]] = {}
    # Keeps a feature map a feature map of the same kind, so it may stand in a residual body (the sum with the
    # shortcut is defined).
    residual_body: ClassVar[bool] = False
    # Works on each feature alone, so a flattened vector's H·W·C order (channels-last frameworks) passes through
    # it to the next layer's weights.
    keeps_feature_order: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A class with a fixed ``type`` is a layer type: registered in ``LAYER_TYPES`` as it is defined."""
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("type")
        if field is not None and isinstance(field.default, str):
            LAYER_TYPES[field.default] = cls

    def tensor(self, name: str) -> Tensor:
        return self.TENSORS[name]

    def fans(self, name: str, shape: Shape) -> Tuple[int, int]:
        """Glorot's (fan_in, fan_out) for tensor ``name`` of canonical ``shape``: by default from its axes."""
        return self.tensor(name).fans(shape)

    def output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def weight_shapes(self, in_shape: Shape) -> Dict[str, Shape]:
        """Trainable tensors, canonical layout."""
        return {}

    def state_shapes(self, in_shape: Shape) -> Dict[str, Shape]:
        """Non-trainable tensors that a checkpoint carries (batchnorm running statistics)."""
        return {}

    def flops(self, in_shape: Shape, out_shape: Shape) -> int:
        return _numel(out_shape)



def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Window(LayerSpec):
    """A sliding window with kernel, stride and padding (the convolutions and the poolings)."""

    padding: Union[str, Pair] = "valid"

    _check_padding = field_validator("padding", mode="before")(lambda cls, v: _padding(v))

    def _window(self) -> Tuple[Pair, Pair]:
        """(extent, stride) per axis; the extent of a dilated kernel is dilation·(k − 1) + 1."""
        raise NotImplementedError

    def spatial_output(self, in_shape: Shape) -> Pair:
        (kh, kw), (sh, sw) = self._window()
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, str) else self.padding
        return (output_size(in_shape[1], kh, sh, ph), output_size(in_shape[2], kw, sw, pw))


class _Convolution(_Window):
    """What every convolution shares: kernel, stride, dilation, activation, bias."""

    TENSORS = {"kernel": CONV_KERNEL, "bias": BIAS}
    residual_body = True
    kernel: Pair = Field(description="Kernel size: int or [h, w].")
    stride: Pair = (1, 1)
    dilation: Pair = Field(default=(1, 1), description="Spacing between kernel taps: int or [h, w].")
    activation: str = "linear"
    bias: bool = True

    _check_kernel = field_validator("kernel", mode="before")(lambda cls, v: _pair(v, "kernel", 1))
    _check_stride = field_validator("stride", mode="before")(lambda cls, v: _pair(v, "stride", 1))
    _check_dilation = field_validator("dilation", mode="before")(lambda cls, v: _pair(v, "dilation", 1))
    _check_activation = field_validator("activation", mode="before")(lambda cls, v: _activation(v))

    @model_validator(mode="after")
    def _stride_or_dilation(self):
        # TensorFlow and Keras implement dilation only at stride 1 (tf.nn.convolution's rule).
        if max(self.stride) > 1 and max(self.dilation) > 1:
            raise ValueError(
                f"stride {list(self.stride)} and dilation {list(self.dilation)} cannot both exceed 1 "
                "(dilated convolutions run at stride 1 in TensorFlow and Keras); set one of them to 1"
            )
        return self

    def _window(self):
        extent = tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))
        return extent, self.stride

    def _depthwise_fans(self, multiplier: int) -> Tuple[int, int]:
        """A depthwise kernel: each output sees one input channel; each input feeds ``multiplier`` outputs."""
        receptive = self.kernel[0] * self.kernel[1]
        return receptive, multiplier * receptive


class Conv2D(_Convolution):
    """Convolution; with ``groups`` g, input and output channels split into g groups convolved separately."""

    type: Literal["conv2d"] = "conv2d"
    filters: int = Field(gt=0, description="Output channels.")
    groups: int = Field(default=1, gt=0, description="Channel groups; filters and input channels divisible by it.")

    @model_validator(mode="after")
    def _filters_in_groups(self):
        if self.filters % self.groups:
            raise ValueError(f"filters ({self.filters}) must be divisible by groups ({self.groups})")
        return self

    def output_shape(self, in_shape):
        _require_3d(in_shape, "conv2d")
        if in_shape[0] % self.groups:
            raise ShapeProblem(
                f"its input has {in_shape[0]} channels, which groups ({self.groups}) does not divide; "
                f"use a groups value that divides both {in_shape[0]} and filters ({self.filters})"
            )
        return (self.filters, *self.spatial_output(in_shape))

    def weight_shapes(self, in_shape):
        shapes = {"kernel": (self.filters, in_shape[0] // self.groups, *self.kernel)}
        if self.bias:
            shapes["bias"] = (self.filters,)
        return shapes

    def fans(self, name, shape):
        fan_in, fan_out = super().fans(name, shape)
        return (fan_in, fan_out // self.groups) if name == "kernel" else (fan_in, fan_out)  # one group's outputs

    def flops(self, in_shape, out_shape):
        return 2 * (in_shape[0] // self.groups) * self.kernel[0] * self.kernel[1] * _numel(out_shape)


class DepthwiseConv2D(_Convolution):
    """Each input channel convolved on its own into ``depth_multiplier`` channels (Keras's DepthwiseConv2D).

    Output channel c·depth_multiplier + j comes from input channel c. Canonical kernel: (C·multiplier, 1, kh, kw).
    """

    type: Literal["depthwise_conv2d"] = "depthwise_conv2d"
    depth_multiplier: int = Field(default=1, gt=0, description="Output channels per input channel.")

    def output_shape(self, in_shape):
        _require_3d(in_shape, self.type)
        return (in_shape[0] * self.depth_multiplier, *self.spatial_output(in_shape))

    def weight_shapes(self, in_shape):
        channels = in_shape[0] * self.depth_multiplier
        shapes = {"kernel": (channels, 1, *self.kernel)}
        if self.bias:
            shapes["bias"] = (channels,)
        return shapes

    def fans(self, name, shape):
        return self._depthwise_fans(self.depth_multiplier) if name == "kernel" else super().fans(name, shape)

    def flops(self, in_shape, out_shape):
        return 2 * self.kernel[0] * self.kernel[1] * _numel(out_shape)


class SeparableConv2D(_Convolution):
    """A depthwise convolution (with ``depth_multiplier``) then a 1×1 convolution to ``filters``, as Keras's
    SeparableConv2D: no bias or activation between the two, one bias and the activation after the 1×1.

    Canonical kernels: ``depthwise_kernel`` (C·multiplier, 1, kh, kw), ``pointwise_kernel`` (filters, C·multiplier,
    1, 1); stride, padding and dilation belong to the depthwise step.
    """

    type: Literal["separable_conv2d"] = "separable_conv2d"
    TENSORS = {"depthwise_kernel": CONV_KERNEL, "pointwise_kernel": CONV_KERNEL, "bias": BIAS}
    filters: int = Field(gt=0, description="Output channels.")
    depth_multiplier: int = Field(default=1, gt=0, description="Depthwise output channels per input channel.")

    def output_shape(self, in_shape):
        _require_3d(in_shape, self.type)
        return (self.filters, *self.spatial_output(in_shape))

    def weight_shapes(self, in_shape):
        middle = in_shape[0] * self.depth_multiplier
        shapes = {"depthwise_kernel": (middle, 1, *self.kernel), "pointwise_kernel": (self.filters, middle, 1, 1)}
        if self.bias:
            shapes["bias"] = (self.filters,)
        return shapes

    def fans(self, name, shape):
        if name == "depthwise_kernel":
            return self._depthwise_fans(self.depth_multiplier)
        return super().fans(name, shape)

    def flops(self, in_shape, out_shape):
        middle = in_shape[0] * self.depth_multiplier
        depthwise = 2 * self.kernel[0] * self.kernel[1] * middle * out_shape[1] * out_shape[2]
        return depthwise + 2 * middle * _numel(out_shape)


class _Pool(_Window):
    residual_body = True
    size: Pair = Field(description="Window size: int or [h, w].")
    stride: Optional[Pair] = Field(default=None, description="Defaults to size.")

    _check_size = field_validator("size", mode="before")(lambda cls, v: _pair(v, "size", 1))
    _check_stride = field_validator("stride", mode="before")(
        lambda cls, v: None if v is None else _pair(v, "stride", 1)
    )

    @property
    def strides(self) -> Pair:
        return self.stride or self.size

    def _window(self):
        return self.size, self.strides

    def output_shape(self, in_shape):
        _require_3d(in_shape, self.type)
        self._check_windows_hold_real_cells(in_shape)
        return (in_shape[0], *self.spatial_output(in_shape))

    def _check_windows_hold_real_cells(self, in_shape: Shape) -> None:
        """A window over padding only has no max and no mean: the layer would output NaN or -inf."""
        pads = (self.padding, self.padding) if isinstance(self.padding, str) else self.padding
        for axis, n, k, s, p in zip(("height", "width"), in_shape[1:], self.size, self.strides, pads):
            which = empty_window(n, k, s, p)
            if which is not None:
                raise ShapeProblem(
                    f"padding {p} on the {axis} axis (size {k}, stride {s}, input {n}) leaves the {which} window "
                    f"with padding only; every pooling window must cover a real cell, so padding must be smaller "
                    f"than size ({k}) on that axis, or use padding: same"
                )

    def flops(self, in_shape, out_shape):
        return self.size[0] * self.size[1] * _numel(out_shape)


class MaxPool(_Pool):
    """Max pooling; padded cells count as -inf."""

    type: Literal["maxpool"] = "maxpool"


class AvgPool(_Pool):
    """Average pooling over the real cells of each window only: padding never counts."""

    type: Literal["avgpool"] = "avgpool"


class _GlobalPool(LayerSpec):
    """C×H×W → C: one value per channel over the whole map."""

    def output_shape(self, in_shape):
        _require_3d(in_shape, self.type)
        return (in_shape[0],)

    def flops(self, in_shape, out_shape):
        return _numel(in_shape)


class GlobalAvgPool(_GlobalPool):
    type: Literal["global_avgpool"] = "global_avgpool"


class GlobalMaxPool(_GlobalPool):
    type: Literal["global_maxpool"] = "global_maxpool"


class Upsample(LayerSpec):
    """Enlarges H and W by integer factors. ``nearest`` repeats each cell; ``bilinear`` interpolates with
    half-pixel centres: output cell i samples input coordinate (i + 0.5)/factor − 0.5, clamped to the edge cells
    (TensorFlow 2's ``tf.image.resize``, Keras's UpSampling2D, PyTorch's ``align_corners=False``)."""

    type: Literal["upsample"] = "upsample"
    size: Pair = Field(default=(2, 2), description="Factor per axis: int or [h, w].")
    interpolation: Literal["nearest", "bilinear"] = "nearest"

    _check_size = field_validator("size", mode="before")(lambda cls, v: _pair(v, "size", 1))

    def output_shape(self, in_shape):
        _require_3d(in_shape, "upsample")
        return (in_shape[0], in_shape[1] * self.size[0], in_shape[2] * self.size[1])

    def flops(self, in_shape, out_shape):
        return (4 if self.interpolation == "bilinear" else 1) * _numel(out_shape)


class Flatten(LayerSpec):
    """C×H×W → C·H·W features, in channels-first order in every framework."""

    type: Literal["flatten"] = "flatten"
    keeps_feature_order = True  # of a vector, which it leaves as it is

    def output_shape(self, in_shape):
        return (_numel(in_shape),)

    def flops(self, in_shape, out_shape):
        return 0


class Dense(LayerSpec):
    type: Literal["dense"] = "dense"
    TENSORS = {"kernel": DENSE_KERNEL, "bias": BIAS}
    units: int = Field(gt=0)
    activation: str = "linear"
    bias: bool = True

    _check_activation = field_validator("activation", mode="before")(lambda cls, v: _activation(v))

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ShapeProblem(
                f"needs a vector but receives a {'×'.join(map(str, in_shape))} feature map; "
                "add {type: flatten} or {type: global_avgpool} before it"
            )
        return (self.units,)

    def weight_shapes(self, in_shape):
        shapes = {"kernel": (self.units, in_shape[0])}
        if self.bias:
            shapes["bias"] = (self.units,)
        return shapes

    def flops(self, in_shape, out_shape):
        return 2 * in_shape[0] * self.units


class Dropout(LayerSpec):
    type: Literal["dropout"] = "dropout"
    residual_body = True
    keeps_feature_order = True
    rate: float = Field(ge=0.0, lt=1.0, description="Fraction of units dropped while training.")


class BatchNorm(LayerSpec):
    """Batch normalisation over channels (feature maps) or features (vectors).

    ``momentum`` follows Keras: running = momentum·running + (1 - momentum)·batch.
    """

    type: Literal["batchnorm"] = "batchnorm"
    TENSORS = {"gamma": FEATURE_SCALE, "beta": FEATURE_SHIFT, "moving_mean": FEATURE_SHIFT,
               "moving_variance": FEATURE_SCALE}
    residual_body = True
    keeps_feature_order = True
    momentum: float = Field(default=0.99, gt=0.0, lt=1.0)
    epsilon: float = Field(default=1e-3, gt=0.0)

    def weight_shapes(self, in_shape):
        return {"gamma": (in_shape[0],), "beta": (in_shape[0],)}

    def state_shapes(self, in_shape):
        return {"moving_mean": (in_shape[0],), "moving_variance": (in_shape[0],)}


class Activation(LayerSpec):
    type: Literal["activation"] = "activation"
    residual_body = True
    keeps_feature_order = True
    fn: str = Field(description=f"{one_of(ACTIVATIONS)} (silu is swish).")

    _check_fn = field_validator("fn", mode="before")(lambda cls, v: _activation(v))


class Softmax(LayerSpec):
    """Class probabilities; must be the last layer. Training fuses it into the cross-entropy loss."""

    type: Literal["softmax"] = "softmax"
    keeps_feature_order = True


class Residual(LayerSpec):
    """``activation(body(x) + shortcut(x))``; the shortcut is a 1×1 strided conv when the shape changes."""

    type: Literal["residual"] = "residual"
    residual_body = True
    layers: List["AnyLayer"] = Field(min_length=1)
    activation: str = "linear"

    _check_activation = field_validator("activation", mode="before")(lambda cls, v: _activation(v))


# Derived from the classes above (each registered itself in LAYER_TYPES when defined), in definition order.
AnyLayer = Annotated[Union[tuple(LAYER_TYPES.values())], Field(discriminator="type")]
Residual.model_rebuild()

# Layers allowed inside a residual body: they work on feature maps, so the sum with the shortcut is defined.
RESIDUAL_BODY_TYPES = tuple(name for name, cls in LAYER_TYPES.items() if cls.residual_body)
