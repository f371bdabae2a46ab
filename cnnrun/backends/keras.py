"""Keras 3 backend: a functional ``keras.Model`` of Keras layers, NHWC, on Keras's TensorFlow or PyTorch backend.

Keras fixes its backend when it is first imported (``KERAS_BACKEND``), so this module imports Keras only when a
runner is created, after setting ``KERAS_BACKEND`` from ``framework.backend``; a process that already imported
Keras with another backend gets a clear error. The user's own Keras settings (``$KERAS_HOME/keras.json`` or
``~/.keras/keras.json``: image_data_format, floatx, epsilon) never reach the network: see :func:`import_keras`. Training goes through cnnrun's shared trainer, not ``model.fit``:

- on TensorFlow, the model runs inside the TensorFlow backend's ``tf.function`` train step (GradientTape over
  the model's variables, cnnrun's PyTorch-rule Adam/SGD), see :class:`cnnrun.backends.tensorflow.TensorFlowRunner`;
- on PyTorch, the model is called eagerly on torch tensors, ``loss.backward()`` fills the Keras variables'
  ``torch.nn.Parameter`` gradients and ``torch.optim`` updates them (the same optimizer as framework=torch), see
  :mod:`cnnrun.backends.keras_torch`.

Padding is explicit wherever a Keras backend could disagree with the spec's TensorFlow semantics: padded max
pooling pads with -inf, padded average pooling divides by each window's real cells (Keras 3's torch backend
counts replicated cells for uneven 'same' pooling, keras-team/keras#19721). Batchnorm updates its running
variance with the unbiased batch variance, as PyTorch and the TensorFlow backend do (Keras itself uses the
biased one).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from cnnrun.backends import BACKENDS
from cnnrun.backends.building import BuildContext, Built, assign_reshaped
from cnnrun.errors import UserError, one_of
from cnnrun.layout import flatten_permutation
from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE
from cnnrun.spec.shapes import real_cell_scale

LAYOUT = BACKENDS["keras"].layout  # CHANNELS_LAST
KERAS_BACKENDS = ("tensorflow", "torch")
# cnnrun's own KERAS_HOME, read while Keras imports: its keras.json holds Keras's defaults, so a user's
# keras.json (channels_first, float16, another epsilon, or a value Keras refuses) never applies.
OWN_KERAS_HOME = Path(__file__).with_name("keras_home")
# The settings cnnrun's Keras network assumes, pinned again when Keras was imported before cnnrun's import.
PINNED_CONFIG = {"image_data_format": "channels_last", "floatx": "float32", "epsilon": 1e-7}
# Batchnorm's training statistics when they span several processes: (x, reduction axes) → (mean, biased variance,
# count), set by a data-parallel engine (cnnrun.distributed, see set_batch_moments); None: this process's batch.
_batch_moments: Optional[Callable] = None


# --------------------------------------------------------------------------------------------------- import


def import_keras(backend: str):
    """Import Keras on ``backend`` (setting KERAS_BACKEND first), or explain why this process cannot."""
    if backend not in KERAS_BACKENDS:
        raise UserError(f"framework.backend={backend!r} is not supported; use {one_of(KERAS_BACKENDS)}")
    loaded = sys.modules.get("keras")
    if loaded is not None:
        active = loaded.backend.backend()
        if active != backend:
            raise UserError(
                f"framework.backend={backend}: Keras was already imported in this process with its {active} "
                "backend, and Keras cannot switch backends once imported; run in a new process"
            )
        return _pinned(loaded)
    os.environ["KERAS_BACKEND"] = backend
    if backend == "tensorflow":
        import cnnrun.backends.tensorflow  # noqa: F401  (imports TensorFlow with its start-up noise filtered)
    with _own_keras_home():
        import keras

    return _pinned(keras)


@contextlib.contextmanager
def _own_keras_home():
    """Point KERAS_HOME at cnnrun's keras.json while Keras reads it (at import), then give the user's back."""
    previous = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(OWN_KERAS_HOME)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("KERAS_HOME", None)
        else:
            os.environ["KERAS_HOME"] = previous


def _pinned(keras):
    """Keras with cnnrun's settings, also when someone imported it before (with a keras.json of their own)."""
    for name, value in PINNED_CONFIG.items():
        if getattr(keras.config, name)() != value:
            getattr(keras.config, f"set_{name}")(value)
    return keras


def set_batch_moments(moments: Optional[Callable]) -> None:
    global _batch_moments
    _batch_moments = moments


def _keras():
    keras = sys.modules.get("keras")
    if keras is None:
        keras = import_keras(os.environ.get("KERAS_BACKEND", "tensorflow"))
    return keras


def framework_version() -> str:
    """Keras's version and the backend it runs on, e.g. ``3.15.1 (tensorflow 2.21.0)``."""
    keras = _keras()
    backend = keras.backend.backend()
    engine = sys.modules[backend]
    return f"{keras.__version__} ({backend} {engine.__version__})"


# --------------------------------------------------------------------------------------------------- layers


# Batchnorm's training statistics when they span several processes: (x, reduction axes) → (mean, biased variance,
# count), set by a data-parallel engine (cnnrun.distributed); None: this process's batch alone.
_batch_moments: Optional[Callable] = None


def set_batch_moments(moments: Optional[Callable]) -> None:
    global _batch_moments
    _batch_moments = moments


@functools.lru_cache(maxsize=None)
def custom_layers() -> SimpleNamespace:
    """The few layers and activations Keras lacks, defined once Keras is imported (their base classes come from
    it). Each is registered under the package "cnnrun" and has a config, so a model using them saves as a
    ``.keras`` file (``task=export export.format=keras``) and loads back where cnnrun is installed."""
    keras = _keras()
    ops = keras.ops
    register = keras.saving.register_keras_serializable(package="cnnrun")

    @register
    def elu(x):
        return keras.activations.elu(x, alpha=ELU_ALPHA)

    @register
    def leaky_relu(x):
        return keras.activations.leaky_relu(x, negative_slope=LEAKY_RELU_SLOPE)

    @register
    def gelu(x):
        return keras.activations.gelu(x, approximate=False)  # stated: the exact form, never the tanh one

    @register
    class ConstantPadding2D(keras.layers.Layer):
        """Pads H and W by ((top, bottom), (left, right)) with a constant (-inf for max pooling)."""

        def __init__(self, pads, value: float, **kwargs):
            super().__init__(**kwargs)
            (top, bottom), (left, right) = pads
            self.paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]
            self.value = value

        def get_config(self):
            return {**super().get_config(), "pads": self.paddings[1:3], "value": self.value}

        def call(self, x):
            return ops.pad(x, self.paddings, constant_values=self.value)

        def compute_output_shape(self, shape):
            n, h, w, c = shape
            (_, rows, cols, _) = self.paddings
            return (n, None if h is None else h + sum(rows), None if w is None else w + sum(cols), c)

    @register
    class RealCellAveragePooling2D(keras.layers.Layer):
        """Average pooling over zero-padded windows, rescaled so each output averages its real cells only."""

        def __init__(self, size, strides, pads, in_hw, **kwargs):
            super().__init__(**kwargs)
            self.size, self.strides, self.in_hw = tuple(size), tuple(strides), tuple(in_hw)
            (top, bottom), (left, right) = pads
            self.paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]
            scale = real_cell_scale(self.in_hw, self.size, self.strides, pads)
            self.scale = scale[None, :, :, None]  # a constant, not a weight

        def get_config(self):
            return {**super().get_config(), "size": self.size, "strides": self.strides, "pads": self.paddings[1:3],
                    "in_hw": self.in_hw}

        def call(self, x):
            pooled = ops.average_pool(ops.pad(x, self.paddings), self.size, self.strides, padding="valid")
            return pooled * ops.convert_to_tensor(self.scale, pooled.dtype)  # the compute dtype (mixed precision)

        def compute_output_shape(self, shape):
            return (shape[0], self.scale.shape[1], self.scale.shape[2], shape[3])

    @register
    class BatchNormalization(keras.layers.BatchNormalization):
        """Keras's batchnorm layer (same weights and count), computed as ``(x - mean)·γ/√(var + ε) + β``.

        Three changes to Keras's ``call``: the running variance is updated with the unbiased batch variance (as
        PyTorch), and the mean is subtracted before scaling. Keras's TensorFlow backend computes
        ``x·s + (β - mean·s)``, which cancels catastrophically when a channel's mean is large against its
        spread (e.g. right after the first conv): gradients of the layers before it were then 0.5 % off.
        And the batch variance is the mean of squared deviations: ``keras.ops.moments`` on the torch backend
        computes E[x²] − E[x]², which cancels in float32 for the same channels (at a mean/spread ratio of a few
        thousand the loss moved by 0.2 and the running-variance update was lost).
        """

        def call(self, inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            if training and self.trainable:
                if _batch_moments is not None:  # statistics over every rank's rows (trainer.sync_batchnorm)
                    mean, variance, n = _batch_moments(x, self._reduction_axes)
                else:
                    mean = ops.mean(x, axis=self._reduction_axes)
                    variance = ops.mean(ops.square(x - mean), axis=self._reduction_axes)
                    n = ops.cast(ops.size(x), "float32") / float(x.shape[-1])
                unbiased = variance * n / ops.maximum(n - 1.0, 1.0)
                keep = self.momentum
                self.moving_mean.assign(self.moving_mean * keep + mean * (1.0 - keep))
                self.moving_variance.assign(self.moving_variance * keep + unbiased * (1.0 - keep))
            else:
                mean, variance = self.moving_mean, self.moving_variance
            scale = self.gamma * ops.rsqrt(variance + self.epsilon)
            return ops.cast((x - mean) * scale + self.beta, self.compute_dtype)

    @register
    class TakeFeatures(keras.layers.Layer):
        """Reorders features (puts a flattened H·W·C vector that reaches the output in C·H·W order)."""

        def __init__(self, perm, **kwargs):
            super().__init__(**kwargs)
            self.perm = np.asarray(perm, np.int32)

        def get_config(self):
            return {**super().get_config(), "perm": self.perm.tolist()}

        def call(self, x):
            return ops.take(x, ops.convert_to_tensor(self.perm), axis=1)

    return SimpleNamespace(
        ConstantPadding2D=ConstantPadding2D,
        RealCellAveragePooling2D=RealCellAveragePooling2D,
        BatchNormalization=BatchNormalization,
        TakeFeatures=TakeFeatures,
        elu=elu,
        leaky_relu=leaky_relu,
        gelu=gelu,
    )


def activation_fn(name: str) -> Optional[Callable]:
    """cnnrun's activation names → Keras activations with cnnrun's constants (None for linear)."""
    acts, custom = _keras().activations, custom_layers()
    return {
        "linear": None,
        "relu": acts.relu,
        "tanh": acts.tanh,
        "sigmoid": acts.sigmoid,
        "elu": custom.elu,
        "leaky_relu": custom.leaky_relu,
        "relu6": acts.relu6,
        "gelu": custom.gelu,
        "swish": acts.silu,
        "hard_swish": acts.hard_swish,  # Keras 3: x·relu6(x + 3)/6, MobileNetV3's
    }[name]


def keras_name(layer: CompiledLayer, suffix: str = "") -> str:
    return layer.name.replace("/", "__") + suffix  # Keras names cannot contain '/'


def _has_pads(layer: CompiledLayer) -> bool:
    return any(sum(p) for p in layer.pads)


def _zero_padded(layer: CompiledLayer, ctx: BuildContext, x):
    """x with the layer's compiled padding applied, for a window layer that then runs with padding='valid'."""
    if _has_pads(layer):
        x = ctx.keras.layers.ZeroPadding2D(layer.pads, name=keras_name(layer, "__pad"))(x)
    return x


def _conv(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    if spec.padding == "same" and spec.dilation == (1, 1):
        padding = "same"  # Keras's 'same' is TensorFlow's rule on both backends (tests/backends checks it)
    else:
        x, padding = _zero_padded(layer, ctx, x), "valid"
    conv = ctx.keras.layers.Conv2D(
        spec.filters, spec.kernel, strides=spec.stride, padding=padding, dilation_rate=spec.dilation,
        groups=spec.groups, activation=activation_fn(spec.activation), use_bias=spec.bias, name=keras_name(layer),
    )
    y = conv(x)
    return Built(y, {"kernel": conv.kernel, **({"bias": conv.bias} if spec.bias else {})})


def _depthwise_conv(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    conv = ctx.keras.layers.DepthwiseConv2D(
        spec.kernel, strides=spec.stride, padding="valid", depth_multiplier=spec.depth_multiplier,
        dilation_rate=spec.dilation, activation=activation_fn(spec.activation), use_bias=spec.bias,
        name=keras_name(layer),
    )
    y = conv(_zero_padded(layer, ctx, x))
    return Built(y, {"kernel": conv.kernel, **({"bias": conv.bias} if spec.bias else {})})


def _separable_conv(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    conv = ctx.keras.layers.SeparableConv2D(
        spec.filters, spec.kernel, strides=spec.stride, padding="valid", depth_multiplier=spec.depth_multiplier,
        dilation_rate=spec.dilation, activation=activation_fn(spec.activation), use_bias=spec.bias,
        name=keras_name(layer),
    )
    y = conv(_zero_padded(layer, ctx, x))
    return Built(y, {"depthwise_kernel": conv.depthwise_kernel, "pointwise_kernel": conv.pointwise_kernel,
                     **({"bias": conv.bias} if spec.bias else {})})


def _upsample(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    # Keras resizes with half-pixel centres on both backends (tf.image.resize; torch's align_corners=False).
    spec = layer.spec
    return Built(ctx.keras.layers.UpSampling2D(spec.size, interpolation=spec.interpolation,
                                               name=keras_name(layer))(x))


def _maxpool(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    if _has_pads(layer):
        x = ctx.custom.ConstantPadding2D(layer.pads, -math.inf, name=keras_name(layer, "__pad"))(x)
    return Built(ctx.keras.layers.MaxPooling2D(spec.size, spec.strides, padding="valid", name=keras_name(layer))(x))


def _avgpool(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    if _has_pads(layer):
        pool = ctx.custom.RealCellAveragePooling2D(
            spec.size, spec.strides, layer.pads, layer.in_shape[1:], name=keras_name(layer)
        )
        return Built(pool(x))
    return Built(ctx.keras.layers.AveragePooling2D(spec.size, spec.strides, padding="valid",
                                                   name=keras_name(layer))(x))


def _global_avgpool(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    return Built(ctx.keras.layers.GlobalAveragePooling2D(name=keras_name(layer))(x))


def _global_maxpool(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    return Built(ctx.keras.layers.GlobalMaxPooling2D(name=keras_name(layer))(x))


def _flatten(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    # H·W·C order; cnnrun.layout permutes the weights of the dense/batchnorm that follows.
    return Built(ctx.keras.layers.Flatten(name=keras_name(layer))(x))


def _dense(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    dense = ctx.keras.layers.Dense(
        spec.units, activation=activation_fn(spec.activation), use_bias=spec.bias, name=keras_name(layer)
    )
    y = dense(x)
    return Built(y, {"kernel": dense.kernel, **({"bias": dense.bias} if spec.bias else {})})


def _dropout(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    ctx.seed += 1  # one seeded stream per dropout layer
    dropout = ctx.keras.layers.Dropout(layer.spec.rate, seed=ctx.seed, name=keras_name(layer))
    if getattr(dropout, "seed_generator", None) is not None:  # Keras makes none for rate 0
        ctx.seed_generators[layer.name] = dropout.seed_generator
    return Built(dropout(x))


def _batchnorm(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    spec = layer.spec
    bn = ctx.custom.BatchNormalization(axis=-1, momentum=spec.momentum, epsilon=spec.epsilon, name=keras_name(layer))
    y = bn(x)
    return Built(y, {"gamma": bn.gamma, "beta": bn.beta, "moving_mean": bn.moving_mean,
                     "moving_variance": bn.moving_variance})


def _activation(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    fn = activation_fn(layer.spec.fn)
    return Built(x if fn is None else ctx.keras.layers.Activation(fn, name=keras_name(layer))(x))


def _softmax(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    return Built(x)  # fused into the loss; predictions apply it


def _residual(layer: CompiledLayer, ctx: BuildContext, x) -> Built:
    y = x
    for child in layer.body:
        y = ctx.build(child, y)
    shortcut = x  # the identity, unless the block has shortcut layers
    for child in layer.shortcut:
        shortcut = ctx.build(child, shortcut)
    y = ctx.keras.layers.Add(name=keras_name(layer, "__add"))([y, shortcut])
    fn = activation_fn(layer.spec.activation)
    return Built(y if fn is None else ctx.keras.layers.Activation(fn, name=keras_name(layer))(y))


# One builder per layer type, keyed like cnnrun.spec.LAYER_TYPES: (layer, ctx, input tensor) → Built(output
# tensor, Keras variables by tensor name). ``ctx`` holds ``keras``, ``custom`` (custom_layers()), the dropout
# ``seed`` and ``seed_generators``.
BUILDERS = {
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
    "dropout": _dropout,
    "batchnorm": _batchnorm,
    "activation": _activation,
    "softmax": _softmax,
    "residual": _residual,
}


def build_model(model: CompiledModel, seed: int) -> Tuple[object, BuildContext]:
    """The compiled model as a functional ``keras.Model`` taking normalised (N, H, W, C) float32 images, and the
    build context (``tensors``: Keras variables by canonical name; ``trainable``; ``seed_generators``)."""
    ctx = BuildContext(BUILDERS, keras=_keras(), custom=custom_layers(), seed=seed, seed_generators={})
    c, h, w = model.input_shape
    inputs = ctx.keras.Input(shape=(h, w, c), name="images")
    x = inputs
    for layer in model.layers:
        x = ctx.build(layer, x)
    perm = flatten_permutation(model)
    if perm is not None:
        x = ctx.custom.TakeFeatures(perm, name="canonical_order")(x)
    return ctx.keras.Model(inputs, x, name=model.name), ctx


def random_state(builder: BuildContext) -> Dict[str, np.ndarray]:
    """The dropout layers' seed-generator states, so that a resumed run draws the masks it would have drawn."""
    return {f"rng/keras/{name}": np.asarray(gen.state.numpy()) for name, gen in builder.seed_generators.items()}


def set_random_state(builder: BuildContext, state: Dict[str, np.ndarray]) -> None:
    """Restore what :func:`random_state` returned (generators it does not mention are left alone)."""
    for name, gen in builder.seed_generators.items():
        key = f"rng/keras/{name}"
        if key in state:
            gen.state.assign(np.asarray(state[key]).astype(gen.state.dtype))


# --------------------------------------------------------------------------------------------------- precision


# trainer.precision → Keras's dtype policy: mixed policies keep float32 variables and compute in the low precision
# (cnnrun's batchnorm computes in float32 either way). Loss scaling for fp16 is the runner's (cnnrun trains
# with its own optimizers, not Keras's, so Keras's LossScaleOptimizer has nothing to wrap): the TensorFlow
# backend's LossScale, or torch.amp.GradScaler through cnnrun.backends.torch.MixedPrecision.
DTYPE_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Keras's global dtype policy set for ``precision`` while a model is built, then restored (the layers keep
    the policy they were built with)."""
    config = _keras().config
    previous = config.dtype_policy()
    config.set_dtype_policy(DTYPE_POLICIES[precision])
    try:
        yield
    finally:
        config.set_dtype_policy(previous)


# --------------------------------------------------------------------------------------------------- TensorFlow


class _TensorFlowVariables:
    """The Keras model's tf.Variables in the shape :class:`cnnrun.backends.tensorflow.TensorFlowRunner` uses."""

    def __init__(self, builder: BuildContext):
        self.by_name = {name: var.value for name, var in builder.tensors.items()}
        self.trainable_names = list(builder.trainable)
        self.trainable = [self.by_name[name] for name in self.trainable_names]


class KerasTensorFlowNetwork:
    """A Keras model behind the TensorFlow backend's network interface (``variables``, ``__call__``)."""

    def __init__(self, model: CompiledModel, initial: Dict[str, np.ndarray], seed: int):
        self.keras_model, self.builder = build_model(model, seed)
        self.variables = _TensorFlowVariables(self.builder)
        for name, var in self.variables.by_name.items():
            assign_reshaped(var, initial[name])

    def random_state(self) -> Dict[str, np.ndarray]:
        return random_state(self.builder)

    def set_random_state(self, state: Dict[str, np.ndarray]) -> None:
        set_random_state(self.builder, state)

    def __call__(self, x, training: bool):
        return self.keras_model(x, training=training)


def _tensorflow_runner(model, optimizer, options, device, seed, mean, std, label_smoothing, precision):
    from cnnrun.backends.tensorflow import TensorFlowRunner

    with dtype_policy(precision):  # the model is built inside the runner
        runner = TensorFlowRunner(model, optimizer, options, device, seed, mean, std, network=KerasTensorFlowNetwork,
                                  label_smoothing=label_smoothing, precision=precision)
    runner.keras_model = runner.net.keras_model
    return runner


# --------------------------------------------------------------------------------------------------- entry


def create_runner(model, optimizer, options, device, seed, mean, std, label_smoothing: float = 0.0,
                  precision: str = "fp32"):
    """A Keras runner on ``options.backend``; importing Keras here (not at module import) honours that choice."""
    import_keras(options.backend)
    if options.backend == "tensorflow":
        return _tensorflow_runner(model, optimizer, options, device, seed, mean, std, label_smoothing, precision)
    from cnnrun.backends.keras_torch import KerasTorchRunner  # imports torch: only for this backend

    return KerasTorchRunner(model, optimizer, options, device, seed, mean, std, label_smoothing, precision)
