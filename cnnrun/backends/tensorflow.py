"""TensorFlow backend: low-level TensorFlow 2 — ``tf.Variable`` weights and ``tf.nn`` ops, NHWC, no Keras.

Each compiled layer becomes a plain function ``(x, training) -> y`` over variables held in a :class:`Network`.
The training step is one ``tf.function`` over a ``GradientTape`` (XLA with ``framework.jit_compile=true``; off by
default because it measured slower on CPU, see benchmarks/RESULTS.md). Adam and SGD are written here with
PyTorch's update rules, so the same hyperparameters give the same steps in every framework.

Semantics follow the compiler (:mod:`cnnrun.spec`): TensorFlow's own 'same'/'valid' rules are used where they
give the compiled padding; other paddings are explicit. Batchnorm normalises with the biased batch variance and,
like PyTorch, updates its running variance with the unbiased one (what ``FusedBatchNormV3`` returns).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from cnnrun.backends import BACKENDS, mean_metrics
from cnnrun.backends.building import (
    BuildContext,
    Built,
    assign_reshaped,
    read_canonical,
    slot_key,
    write_canonical,
)
from cnnrun.backends.devices import gpu_index
from cnnrun.data.rows import chunks
from cnnrun.layout import flatten_permutation, from_canonical, to_canonical
from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE

# TensorFlow's C++ runtime logs to stderr while importing and probing for CUDA; none of it helps a cnnrun user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# absl prints lines like "I0000 00:00:17… cudart_stub.cc:31] Could not find cuda drivers…" before it reads any
# log-level setting, so they are filtered out of stderr at the file-descriptor level while TensorFlow starts.
_ABSL_NOISE = re.compile(r"^(?:[IWE]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog)")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Swallow the native runtime's start-up log lines on fd 2; anything else written there is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines(True)
            kept = [line for line in lines if not _ABSL_NOISE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _import_tensorflow():
    """``import tensorflow`` without its start-up noise, and without Keras when Keras is not loaded yet.

    TensorFlow's ``__init__`` eagerly imports ``keras.src.optimizers`` (only to register them for SavedModel)
    and ignores an ImportError there. That import is half of TensorFlow's start-up time, and it would fix
    Keras's backend from the user's KERAS_BACKEND (=torch would pull PyTorch into framework=tensorflow), so
    Keras is masked while TensorFlow loads; ``import keras`` later (framework=keras) works as usual.
    """
    mask_keras = "keras" not in sys.modules
    if mask_keras:
        sys.modules["keras"] = None  # makes `import keras…` raise ImportError at once
    try:
        with quiet_native_stderr():
            import tensorflow

            gpus = tensorflow.config.list_physical_devices("GPU")  # probes CUDA now, while stderr is filtered
    finally:
        if mask_keras and "keras" in sys.modules and sys.modules["keras"] is None:
            del sys.modules["keras"]
    return tensorflow, gpus


tf, GPUS = _import_tensorflow()

from cnnrun.backends.tensorflow_precision import (  # noqa: E402  (needs TensorFlow loaded as above)
    COMPUTE_DTYPES, LossScale, in_float32, reads_in,
)

LAYOUT = BACKENDS["tensorflow"].layout  # CHANNELS_LAST
Op = Callable[[tf.Tensor, bool], tf.Tensor]


def framework_version() -> str:
    """TensorFlow's version, e.g. ``2.21.0``."""
    return tf.__version__


# --------------------------------------------------------------------------------------------------- device


def resolve_device(device) -> Tuple[str, str]:
    """cpu / cuda / cuda:N / auto → (TensorFlow device string, readable name), or a UserError saying why not."""
    cuda = "with" if tf.test.is_built_with_cuda() else "without"
    index = gpu_index(device, len(GPUS), "TensorFlow", f"TensorFlow {tf.__version__} (built {cuda} CUDA) sees no "
                                                       "usable GPU; use device=cpu or device=auto")
    if index is None:
        return "/CPU:0", "cpu"
    # TensorFlow runs float32 convolutions and matmuls in TF32 on Ampere and newer GPUs unless told not to; IEEE
    # float32 keeps its outputs equal to the other frameworks' (torch's framework.tf32 is the opt-in there).
    tf.config.experimental.enable_tensor_float_32_execution(False)
    details = tf.config.experimental.get_device_details(GPUS[index])
    # TensorFlow numbers the GPUs it was allowed to use (a data-parallel rank is allowed only its own one).
    visible = tf.config.get_visible_devices("GPU")
    logical = visible.index(GPUS[index]) if GPUS[index] in visible else index
    return f"/GPU:{logical}", f"cuda:{index} ({details.get('device_name', 'GPU')})"


def configure_threads(threads: Optional[int]) -> None:
    """device.threads → TensorFlow's thread pools (possible only before its runtime starts in this process)."""
    if not threads:
        return
    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        warnings.warn(
            f"device.threads={threads} ignored: TensorFlow's runtime had already started in this process",
            stacklevel=2,
        )


# --------------------------------------------------------------------------------------------------- layers


def _elu(x):
    return tf.nn.elu(x) if ELU_ALPHA == 1.0 else tf.where(x > 0, x, ELU_ALPHA * tf.math.expm1(x))


ACTIVATIONS: Dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "linear": tf.identity,
    "relu": tf.nn.relu,
    "tanh": tf.tanh,
    "sigmoid": tf.sigmoid,
    "elu": _elu,
    "leaky_relu": lambda x: tf.nn.leaky_relu(x, alpha=LEAKY_RELU_SLOPE),
    "relu6": tf.nn.relu6,
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),  # the exact erf form
    "swish": tf.nn.silu,
    "hard_swish": lambda x: x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0),  # TensorFlow has no op of its own
}


class Variables:
    """The model's tf.Variables by canonical name (``by_name``) and its trainable ones, in build order."""

    def __init__(self, ctx: BuildContext):
        self.by_name: Dict[str, tf.Variable] = dict(ctx.tensors)
        self.trainable_names: List[str] = list(ctx.trainable)
        self.trainable: List[tf.Variable] = [self.by_name[name] for name in self.trainable_names]


def _variables(layer: CompiledLayer, ctx: BuildContext, *params: str, shapes=None) -> Dict[str, tf.Variable]:
    """tf.Variables for ``params`` of ``layer``, from ``ctx.initial`` (already in NHWC layout; reshaped to
    ``shapes[param]`` where TensorFlow holds a tensor in another shape, e.g. a depthwise kernel); states (running
    statistics) are not trainable."""
    shapes = shapes or {}
    return {
        param: tf.Variable(np.reshape(ctx.initial[f"{layer.name}/{param}"], shapes.get(param, -1))
                           if param in shapes else ctx.initial[f"{layer.name}/{param}"],
                           trainable=param in layer.weights, name=f"{layer.name}/{param}".replace("/", "__"))
        for param in params
    }


def _compute_reads(ctx: BuildContext, tensors: Dict[str, tf.Variable]) -> Dict[str, Any]:
    """What a layer's ops hold for its ``tensors``: each variable, or its view in the compute dtype (kernels and
    biases under bf16/fp16, see :mod:`cnnrun.backends.tensorflow_precision`)."""
    return {param: reads_in(var, param, ctx.compute_dtype) for param, var in tensors.items()}


def _explicit_pads(layer: CompiledLayer) -> List[List[int]]:
    (top, bottom), (left, right) = layer.pads
    return [[0, 0], [top, bottom], [left, right], [0, 0]]


def _has_pads(layer: CompiledLayer) -> bool:
    return any(sum(p) for p in layer.pads)


def _conv_padding(layer: CompiledLayer):
    """TensorFlow's own 'SAME'/'VALID' where they give the compiled pads (they do by definition), else explicit."""
    if layer.spec.padding == "same":
        return "SAME"
    return _explicit_pads(layer) if _has_pads(layer) else "VALID"


def _conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    """conv2d; with groups, its (kh, kw, C/groups, filters) kernel makes tf.nn.conv2d a grouped convolution."""
    spec = layer.spec
    tensors = _variables(layer, ctx, *layer.weights)
    reads = _compute_reads(ctx, tensors)
    kernel, bias = reads["kernel"], reads.get("bias")
    strides, padding, act = (1, *spec.stride, 1), _conv_padding(layer), ACTIVATIONS[spec.activation]
    dilations = (1, *spec.dilation, 1)

    def conv(x, training):
        y = tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)
        return act(tf.nn.bias_add(y, bias) if bias is not None else y)

    return Built(conv, tensors)


def _padded_depthwise(layer: CompiledLayer, kernel) -> Op:
    """tf.nn.depthwise_conv2d after explicit zero padding (its dilated form takes 'SAME'/'VALID' only)."""
    spec = layer.spec
    pads = _explicit_pads(layer) if _has_pads(layer) else None
    strides = (1, *spec.stride, 1)

    def depthwise(x, training):
        if pads is not None:
            x = tf.pad(x, pads)
        return tf.nn.depthwise_conv2d(x, kernel, strides, "VALID", dilations=spec.dilation)

    return depthwise


def _depthwise_shape(layer: CompiledLayer) -> Tuple[int, ...]:
    """tf.nn.depthwise_conv2d's kernel (kh, kw, C, multiplier): HWIO (kh, kw, 1, C·multiplier) reshaped."""
    return (*layer.spec.kernel, layer.in_shape[0], layer.spec.depth_multiplier)


def _depthwise_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    spec = layer.spec
    tensors = _variables(layer, ctx, *layer.weights, shapes={"kernel": _depthwise_shape(layer)})
    reads = _compute_reads(ctx, tensors)
    depthwise, bias = _padded_depthwise(layer, reads["kernel"]), reads.get("bias")
    act = ACTIVATIONS[spec.activation]

    def depthwise_conv(x, training):
        y = depthwise(x, training)
        return act(tf.nn.bias_add(y, bias) if bias is not None else y)

    return Built(depthwise_conv, tensors)


def _separable_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    """Depthwise, then the 1×1 pointwise conv with the layer's bias and activation (Keras's SeparableConv2D)."""
    spec = layer.spec
    tensors = _variables(layer, ctx, *layer.weights, shapes={"depthwise_kernel": _depthwise_shape(layer)})
    reads = _compute_reads(ctx, tensors)
    depthwise = _padded_depthwise(layer, reads["depthwise_kernel"])
    pointwise, bias = reads["pointwise_kernel"], reads.get("bias")
    act = ACTIVATIONS[spec.activation]

    def separable_conv(x, training):
        y = tf.nn.conv2d(depthwise(x, training), pointwise, 1, "VALID")
        return act(tf.nn.bias_add(y, bias) if bias is not None else y)

    return Built(separable_conv, tensors)


def _upsample(layer: CompiledLayer, ctx: BuildContext) -> Op:
    """bilinear: tf.image.resize (TensorFlow 2's half-pixel centres); nearest: each cell repeated (the same
    numbers as resize's nearest, and its gradient compiles under XLA, ResizeNearestNeighborGrad does not)."""
    spec = layer.spec
    if spec.interpolation == "bilinear":
        size = tuple(layer.out_shape[1:])
        return lambda x, training: tf.image.resize(x, size, method="bilinear")
    rows, cols = spec.size
    return lambda x, training: tf.repeat(tf.repeat(x, rows, axis=1), cols, axis=2)


def _maxpool(layer: CompiledLayer, ctx: BuildContext) -> Op:
    spec = layer.spec
    ksize, strides = (1, *spec.size, 1), (1, *spec.strides, 1)
    if spec.padding == "same" or not _has_pads(layer):
        # TF's 'SAME' max pooling ignores padded cells, which is the compiled -inf padding.
        padding = "SAME" if spec.padding == "same" else "VALID"
        return lambda x, training: tf.nn.max_pool2d(x, ksize, strides, padding)
    pads = _explicit_pads(layer)
    return lambda x, training: tf.nn.max_pool2d(tf.pad(x, pads, constant_values=-math.inf), ksize, strides, "VALID")


def _avgpool(layer: CompiledLayer, ctx: BuildContext) -> Op:
    spec = layer.spec
    ksize, strides = (1, *spec.size, 1), (1, *spec.strides, 1)
    if spec.padding == "same" or not _has_pads(layer):
        # TF's 'SAME' average pooling divides by the real cells of each window, as the spec requires.
        padding = "SAME" if spec.padding == "same" else "VALID"
        return lambda x, training: tf.nn.avg_pool2d(x, ksize, strides, padding)
    # Explicit int padding: average over zero-padded windows, then rescale each window by k / (its real cells).
    pads = _explicit_pads(layer)
    scale = tf.constant(layer.real_cell_scale()[None, :, :, None])
    return lambda x, training: tf.nn.avg_pool2d(tf.pad(x, pads), ksize, strides, "VALID") * scale


def _global_avgpool(layer: CompiledLayer, ctx: BuildContext) -> Op:
    return lambda x, training: tf.reduce_mean(x, axis=(1, 2))


def _global_maxpool(layer: CompiledLayer, ctx: BuildContext) -> Op:
    return lambda x, training: tf.reduce_max(x, axis=(1, 2))


def _flatten(layer: CompiledLayer, ctx: BuildContext) -> Op:
    # NHWC flattens in H·W·C order; cnnrun.layout permutes the weights of the dense/batchnorm that follows.
    size = int(np.prod(layer.out_shape))
    return lambda x, training: tf.reshape(x, (-1, size))


def _dense(layer: CompiledLayer, ctx: BuildContext) -> Built:
    spec = layer.spec
    tensors = _variables(layer, ctx, *layer.weights)
    reads = _compute_reads(ctx, tensors)
    kernel, bias = reads["kernel"], reads.get("bias")
    act = ACTIVATIONS[spec.activation]

    def dense(x, training):
        y = tf.matmul(x, kernel)
        return act(tf.nn.bias_add(y, bias) if bias is not None else y)

    return Built(dense, tensors)


def _dropout(layer: CompiledLayer, ctx: BuildContext) -> Op:
    rate = layer.spec.rate
    if rate == 0.0:
        return lambda x, training: x

    def dropout(x, training):
        if not training:
            return x
        keep = ctx.rng.uniform(tf.shape(x)) >= rate  # the runner's seeded generator: same masks for the same seed
        return tf.where(keep, x * (1.0 / (1.0 - rate)), tf.zeros_like(x))

    return dropout


def _batchnorm(layer: CompiledLayer, ctx: BuildContext) -> Built:
    spec = layer.spec
    tensors = _variables(layer, ctx, "gamma", "beta", "moving_mean", "moving_variance")
    gamma, beta, mean_var, var_var = tensors.values()
    keep = spec.momentum  # Keras's convention: running = keep·running + (1 - keep)·batch
    feature_map = len(layer.in_shape) == 3

    def update(batch_mean, batch_var_unbiased):
        mean_var.assign(keep * mean_var + (1.0 - keep) * batch_mean)
        var_var.assign(keep * var_var + (1.0 - keep) * batch_var_unbiased)

    def batchnorm_map(x, training):
        if training:  # the explicit rule: XLA's fused training kernel takes E[x²] − E[x]², NaN on large means
            return normalise(x, training, axes=[0, 1, 2])
        # Inference: one fused kernel with the running statistics (nothing to cancel there).
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean=mean_var, variance=var_var, epsilon=spec.epsilon, data_format="NHWC",
            is_training=False,
        )
        return y

    def normalise(x, training, axes):
        if training:
            mean, variance, n = batch_moments(x, axes, ctx.sync_batchnorm)
            update(mean, variance * n / tf.maximum(n - 1.0, 1.0))  # unbiased, as PyTorch
        else:
            mean, variance = mean_var, var_var
        # (x - mean)·s, not tf.nn.batch_normalization's x·s - mean·s, which cancels when |mean| ≫ spread.
        return (x - mean) * (gamma * tf.math.rsqrt(variance + spec.epsilon)) + beta

    return Built(batchnorm_map if feature_map else (lambda x, training: normalise(x, training, axes=[0])), tensors)


def batch_moments(x: tf.Tensor, axes: List[int], synced: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(mean, biased variance, count) of ``x`` over ``axes``: of this replica's batch, or with ``synced`` of the
    global batch across every replica of a tf.distribute strategy (SyncBatchNorm; shards may differ in size).

    Both are means of exact sums and squared deviations, so the synced statistics equal one process's on the
    whole batch up to the order of additions."""
    if not synced:
        mean, variance = tf.nn.moments(x, axes=axes)  # the mean of squared deviations: no cancellation
        return mean, variance, tf.cast(tf.size(x) // tf.size(mean), x.dtype)
    replicas = tf.distribute.get_replica_context()
    count = tf.cast(tf.size(x) // x.shape[-1], x.dtype)
    total, count = replicas.all_reduce(tf.distribute.ReduceOp.SUM, [tf.reduce_sum(x, axis=axes), count])
    mean = total / count
    squares = replicas.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.square(x - mean), axis=axes))
    return mean, squares / count, count


def _activation(layer: CompiledLayer, ctx: BuildContext) -> Op:
    act = ACTIVATIONS[layer.spec.fn]
    return lambda x, training: act(x)


def _identity(layer: CompiledLayer, ctx: BuildContext) -> Op:
    return lambda x, training: x


def _residual(layer: CompiledLayer, ctx: BuildContext) -> Op:
    body = [ctx.build(child) for child in layer.body]
    shortcut = [ctx.build(child) for child in layer.shortcut]  # empty: the identity
    act = ACTIVATIONS[layer.spec.activation]

    def residual(x, training):
        y, s = x, x
        for op in body:
            y = op(y, training)
        for op in shortcut:
            s = op(s, training)
        return act(y + s)

    return residual


def _op(builder: Callable[[CompiledLayer, BuildContext], Op]) -> Callable[[CompiledLayer, BuildContext], Built]:
    """A builder of a layer without tensors, from a function that makes its op."""
    return lambda layer, ctx: Built(builder(layer, ctx))


# One builder per layer type, keyed like cnnrun.spec.LAYER_TYPES: (layer, ctx) → Built(op, tensors) with
# op(x, training) → y. ``ctx.initial`` holds the initial values (NHWC), ``ctx.rng`` the dropout generator.
BUILDERS: Dict[str, Callable[[CompiledLayer, BuildContext], Built]] = {
    "conv2d": _conv,
    "depthwise_conv2d": _depthwise_conv,
    "separable_conv2d": _separable_conv,
    "maxpool": _op(_maxpool),
    "avgpool": _op(_avgpool),
    "global_avgpool": _op(_global_avgpool),
    "global_maxpool": _op(_global_maxpool),
    "upsample": _op(_upsample),
    "flatten": _op(_flatten),
    "dense": _dense,
    "dropout": _op(_dropout),
    "batchnorm": _batchnorm,
    "activation": _op(_activation),
    "softmax": _op(_identity),  # fused into the loss; predictions apply it
    "residual": _op(_residual),
}


class _Context(BuildContext):
    """The shared BuildContext; with bf16/fp16, the layer types that compute in float32 get their input cast up
    and their output back (``in_float32``), residual children included."""

    def build(self, layer: CompiledLayer, *inputs: Any) -> Op:
        return in_float32(super().build(layer, *inputs), layer.type, self.compute_dtype)


class Network:
    """The compiled model as a chain of ops over NHWC tensors; ``variables.by_name`` holds every tensor."""

    def __init__(self, model: CompiledModel, initial: Dict[str, np.ndarray], seed: int, compute_dtype=tf.float32):
        self.rng = tf.random.Generator.from_seed(seed)
        # sync_batchnorm: batchnorm statistics over every replica's shard (read when a training step is traced).
        self._ctx = ctx = _Context(BUILDERS, initial=initial, rng=self.rng, sync_batchnorm=False,
                                   compute_dtype=compute_dtype)
        self.ops = [ctx.build(layer) for layer in model.layers]
        self.variables = Variables(ctx)
        perm = flatten_permutation(model)
        self.output_perm = None if perm is None else tf.constant(perm)

    def synchronise_batchnorm(self) -> None:
        """Batchnorm layers take their training statistics over every replica of a tf.distribute strategy."""
        self._ctx.sync_batchnorm = True

    def random_state(self) -> Dict[str, np.ndarray]:
        """The dropout generator's state, so that a resumed run draws the masks it would have drawn."""
        return {"rng/tensorflow": self.rng.state.numpy()}

    def set_random_state(self, state: Dict[str, np.ndarray]) -> None:
        if "rng/tensorflow" in state:
            self.rng.reset(np.asarray(state["rng/tensorflow"], np.int64))

    def __call__(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        for op in self.ops:
            x = op(x, training)
        if self.output_perm is not None:  # a flattened map reaches the output: put it in canonical C·H·W order
            x = tf.gather(x, self.output_perm, axis=1)
        return x


# --------------------------------------------------------------------------------------------------- optimizers


class _Optimizer:
    """Shared parts: the learning rate as a variable (a schedule assigns it between steps without a retrace),
    an optional step counter, and one dict of PyTorch-named slot variables per trainable variable."""

    SLOTS: tuple = ()

    def __init__(self, cfg, variables: List[tf.Variable], counts_steps: bool):
        self.cfg = cfg
        self.lr = tf.Variable(cfg.lr, trainable=False, dtype=tf.float32, name="learning_rate")
        self.step = tf.Variable(0.0, trainable=False, name="step") if counts_steps else None
        self.slots = [{s: tf.Variable(tf.zeros_like(v), trainable=False) for s in self.SLOTS} for v in variables]

    def l2(self, grad: tf.Tensor, var: tf.Variable) -> tf.Tensor:
        """The gradient with L2 weight decay added (PyTorch's ``weight_decay`` for Adam, SGD and RMSprop)."""
        return grad + self.cfg.weight_decay * var if self.cfg.weight_decay else grad


class Adam(_Optimizer):
    """PyTorch's Adam (L2 ``weight_decay`` added to the gradient; ``eps`` added to the bias-corrected √v), and
    AdamW (``decoupled``: ``p ← p·(1 - lr·weight_decay)`` before the same update, as ``torch.optim.AdamW``).

    TensorFlow's fused ``ResourceApplyAdam`` kernel computes ``lr·√(1-β₂ᵗ)/(1-β₁ᵗ) · m / (√v + ε')``; with
    ``ε' = eps·√(1-β₂ᵗ)`` that is exactly ``lr/(1-β₁ᵗ) · m / (√v/√(1-β₂ᵗ) + eps)``, PyTorch's formula.
    """

    SLOTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, cfg, variables: List[tf.Variable]):
        super().__init__(cfg, variables, counts_steps=True)
        self.decoupled = cfg.name == "adamw"

    def apply(self, grads: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        cfg = self.cfg
        step = self.step.assign_add(1.0)
        beta1_power, beta2_power = tf.pow(cfg.beta1, step), tf.pow(cfg.beta2, step)
        epsilon = cfg.eps * tf.sqrt(1.0 - beta2_power)
        for grad, var, slots in zip(grads, variables, self.slots):
            if self.decoupled:
                if cfg.weight_decay:
                    var.assign(var * (1.0 - self.lr * cfg.weight_decay))
            else:
                grad = self.l2(grad, var)
            tf.raw_ops.ResourceApplyAdam(
                var=var.handle, m=slots["exp_avg"].handle, v=slots["exp_avg_sq"].handle,
                beta1_power=beta1_power, beta2_power=beta2_power, lr=self.lr, beta1=cfg.beta1, beta2=cfg.beta2,
                epsilon=epsilon, grad=grad,
            )


class SGD(_Optimizer):
    """PyTorch's SGD: ``buf = momentum·buf + g``; step ``lr·buf`` (or ``lr·(g + momentum·buf)`` with Nesterov).

    TensorFlow's ``ResourceApplyMomentum`` kernel is that rule exactly (no dampening, Nesterov as PyTorch's).
    """

    def __init__(self, cfg, variables: List[tf.Variable]):
        self.SLOTS = ("momentum_buffer",) if cfg.momentum else ()
        super().__init__(cfg, variables, counts_steps=False)  # PyTorch's SGD keeps no step count either

    def apply(self, grads: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        cfg = self.cfg
        for grad, var, slots in zip(grads, variables, self.slots):
            grad = self.l2(grad, var)
            if cfg.momentum:
                tf.raw_ops.ResourceApplyMomentum(
                    var=var.handle, accum=slots["momentum_buffer"].handle, lr=self.lr, grad=grad,
                    momentum=cfg.momentum, use_nesterov=cfg.nesterov,
                )
            else:
                var.assign_sub(self.lr * grad)


class RMSprop(_Optimizer):
    """PyTorch's RMSprop (not centered): ``s = α·s + (1-α)·g²``; ``d = g / (√s + eps)``; with momentum
    ``buf = m·buf + d`` and ``p -= lr·buf``, else ``p -= lr·d``. TensorFlow's own kernel puts eps inside the root
    and lr inside the momentum buffer, so the rule is written out here."""

    def __init__(self, cfg, variables: List[tf.Variable]):
        self.SLOTS = ("square_avg", "momentum_buffer") if cfg.momentum else ("square_avg",)
        super().__init__(cfg, variables, counts_steps=True)  # PyTorch counts RMSprop's steps (unused by the rule)

    def apply(self, grads: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        cfg = self.cfg
        self.step.assign_add(1.0)
        for grad, var, slots in zip(grads, variables, self.slots):
            grad = self.l2(grad, var)
            square_avg = slots["square_avg"].assign(cfg.alpha * slots["square_avg"] + (1.0 - cfg.alpha) * grad * grad)
            direction = grad / (tf.sqrt(square_avg) + cfg.eps)
            if cfg.momentum:
                direction = slots["momentum_buffer"].assign(cfg.momentum * slots["momentum_buffer"] + direction)
            var.assign_sub(self.lr * direction)


OPTIMIZERS = {"adam": Adam, "adamw": Adam, "sgd": SGD, "rmsprop": RMSprop}


def clip_by_global_norm(grads: List[tf.Tensor], max_norm: float) -> List[tf.Tensor]:
    """PyTorch's ``clip_grad_norm_``: scale by min(1, max_norm / (global norm + 1e-6)) (TensorFlow's own
    ``clip_by_global_norm`` omits the 1e-6)."""
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
    scale = tf.minimum(1.0, max_norm / (norm + 1e-6))
    return [g * scale for g in grads]


def make_optimizer(cfg, variables: List[tf.Variable]):
    """The optimizer config → an object with ``apply(grads, variables)`` and PyTorch-named slots."""
    return OPTIMIZERS[cfg.name](cfg, variables)


def optimizer_state(model: CompiledModel, optimizer, names: List[str]) -> Dict[str, np.ndarray]:
    """Slots in canonical layout under PyTorch's names (``<tensor>/exp_avg``, ``<tensor>/step`` …)."""
    state: Dict[str, np.ndarray] = {}
    for slot in optimizer.SLOTS:
        native = {name: slots[slot].numpy() for name, slots in zip(names, optimizer.slots)}
        state.update({slot_key(name, slot): value for name, value in to_canonical(model, native, LAYOUT).items()})
    if optimizer.step is not None:
        step = np.asarray(optimizer.step.numpy(), np.float32)
        state.update({slot_key(name, "step"): step.copy() for name in names})
    return state


def set_optimizer_state(model: CompiledModel, optimizer, names: List[str], state: Dict[str, np.ndarray]) -> None:
    """Restore what :func:`optimizer_state` returned (missing slots keep their current values)."""
    steps = [state[slot_key(name, "step")] for name in names if slot_key(name, "step") in state]
    if steps and optimizer.step is not None:
        optimizer.step.assign(float(np.asarray(steps[0]).reshape(())))
    for slot in optimizer.SLOTS:
        canonical = {name: state[slot_key(name, slot)] for name in names if slot_key(name, slot) in state}
        native = from_canonical(model, canonical, LAYOUT)
        for name, slots in zip(names, optimizer.slots):
            if name in native:
                assign_reshaped(slots[slot], native[name])


# --------------------------------------------------------------------------------------------------- runner


def cross_entropies(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
    """Each sample's softmax cross-entropy of logits against integer labels (the softmax layer is fused in here).

    With label smoothing ε, PyTorch's definition: (1-ε)·(-log p_label) + ε·mean over classes of (-log p).
    """
    if not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    log_p = tf.nn.log_softmax(logits)
    nll = -tf.gather(log_p, labels, axis=1, batch_dims=1)
    uniform = -tf.reduce_mean(log_p, axis=1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def _int64(labels):
    """Labels as the compiled step's int64: a NumPy batch converted, a held tensor (int64 already) as it is."""
    return labels if isinstance(labels, tf.Tensor) else labels.astype(np.int64, copy=False)


class TensorFlowRunner:
    """The Runner protocol over a network of tf.Variables: compiled train and predict functions, metrics on device.

    ``network(model, initial_native_weights, seed)`` builds the model: :class:`Network` here; the Keras backend
    passes a Keras functional model behind the same interface (``variables`` and ``__call__(x, training)``).
    """

    def __init__(self, model: CompiledModel, optimizer, options, device, seed: int, mean, std, network=None,
                 label_smoothing: float = 0.0, precision: str = "fp32"):
        from cnnrun.spec.init import initial_weights

        configure_threads(device.threads)
        self.model = model
        self.device, self.device_name = resolve_device(device)
        # bf16/fp16: ops compute in it, variables stay float32 (see cnnrun.backends.tensorflow_precision); a Keras
        # network gets the same from the dtype policy it was built under.
        self.compute_dtype = COMPUTE_DTYPES[precision]
        with tf.device(self.device):
            initial = from_canonical(model, initial_weights(model, seed), LAYOUT)
            if network is None:
                self.net = Network(model, initial, seed, self.compute_dtype)
            else:
                self.net = network(model, initial, seed)
            self.loss_scale = LossScale() if precision == "fp16" else None
            self.optimizer = make_optimizer(optimizer, self.net.variables.trainable)
            self.clip_norm = optimizer.clip_norm
            self.label_smoothing = label_smoothing
            self.mean = tf.constant(np.asarray(mean, np.float32))
            self.inv_std = tf.constant(1.0 / np.asarray(std, np.float32))
            self._loss_sum = tf.Variable(0.0, trainable=False)
            self._correct = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._count = 0
        self.jit = bool(options.jit_compile)
        self.strategy = None  # a tf.distribute strategy once this process trains as one replica of several
        self.global_batch: Optional[int] = None  # then: the size of the global batch the next step's is a shard of
        self._compile()

    def _compile(self) -> None:
        c, h, w = self.model.input_shape
        images = tf.TensorSpec((None, h, w, c), tf.uint8)
        labels = tf.TensorSpec((None,), tf.int64)
        scalar = tf.TensorSpec((), tf.float32)
        # Fixed signatures: one trace serves every batch size, the last short batch included.
        jit = self.jit
        step = self._train_step if self.strategy is None else self._replica_step
        self._train = tf.function(step, input_signature=[images, labels, scalar], jit_compile=jit)
        # Mixup/cutmix batches: their own trace (partner labels and λ), so plain batches pay nothing for them.
        self._train_mixed = tf.function(step, input_signature=[images, labels, scalar, labels, scalar],
                                        jit_compile=jit)
        self._predict = tf.function(self.logits, input_signature=[images], jit_compile=jit)

    def distribute(self, strategy) -> None:
        """Train as one replica of ``strategy`` (one per worker process): each step all-reduces the gradients.
        The variables stay this process's own; every replica starts from the same ones and applies the same
        summed gradients, so they stay equal."""
        self.strategy = strategy
        self._compile()

    def _inputs(self, images: tf.Tensor) -> tf.Tensor:
        return tf.cast((tf.cast(images, tf.float32) - self.mean) * self.inv_std, self.compute_dtype)

    def _replica_step(self, *args) -> None:
        self.strategy.run(self._train_step, args=args)

    def _train_step(self, images: tf.Tensor, labels: tf.Tensor, total: tf.Tensor, partners=None, lam=None) -> None:
        """One step on this process's images. ``total``: the samples of the global batch these are a shard of;
        the objective is their summed loss over ``total``, so the gradients summed over every shard are the
        gradient of the global batch's mean loss."""
        variables = self.net.variables.trainable
        with tf.GradientTape() as tape:
            logits = tf.cast(self.net(self._inputs(images), training=True), tf.float32)  # the loss in float32
            loss_sum = tf.reduce_sum(cross_entropies(labels, logits, self.label_smoothing))
            if partners is not None:
                partner_sum = tf.reduce_sum(cross_entropies(partners, logits, self.label_smoothing))
                loss_sum = lam * loss_sum + (1.0 - lam) * partner_sum
            objective = loss_sum / total
            scaled = objective if self.loss_scale is None else objective * self.loss_scale.scale
        grads = tape.gradient(scaled, variables)
        if self.strategy is not None:
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        if self.loss_scale is None:
            self._apply(grads, variables)
        else:
            # Unscaled after the all-reduce: every replica sees the same sums, so all skip the same overflowed
            # steps and keep the same scale.
            grads, finite = self.loss_scale.unscale(grads)
            if finite:  # a tf.cond: an overflowed fp16 step changes nothing but the scale
                self._apply(grads, variables)
            self.loss_scale.update(finite)
        self._loss_sum.assign_add(loss_sum)
        self._correct.assign_add(tf.reduce_sum(tf.cast(tf.argmax(logits, 1) == labels, tf.int64)))

    def _apply(self, grads: List[tf.Tensor], variables: List[tf.Variable]) -> None:
        if self.clip_norm:
            grads = clip_by_global_norm(grads, self.clip_norm)
        self.optimizer.apply(grads, variables)

    def logits(self, images: tf.Tensor) -> tf.Tensor:
        """uint8 (N, H, W, C) → float32 logits in inference mode, as graph ops (also what a SavedModel export
        serves)."""
        return tf.cast(self.net(self._inputs(images), training=False), tf.float32)

    def hold(self, array) -> tf.Tensor:
        """``array`` (an array or a memory-mapped split) as a tensor on this runner's device, copied once a
        bounded chunk at a time (then joined there: the host never holds a second copy of a large split)."""
        with tf.device(self.device):
            parts = [tf.identity(tf.convert_to_tensor(np.ascontiguousarray(chunk))) for chunk in chunks(array)]
            return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)

    def stage(self, array):
        """A host batch copied to the GPU on the prefetch thread, ahead of its step (TensorFlow orders the copy
        before the ops that read it); on the CPU the batch itself."""
        if self.device.startswith("/CPU"):
            return array
        with tf.device(self.device):
            return tf.identity(array)

    def gather(self, held: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        with tf.device(self.device):
            return tf.gather(held, index)

    def device_memory(self) -> None:
        """TensorFlow reports what it has allocated, not what is free: unknown (dataset.on_device=auto keeps
        host batches)."""
        return None

    def train_step(self, images, labels, mix=None) -> None:
        total = np.float32(len(labels) if self.global_batch is None else self.global_batch)
        with tf.device(self.device):
            if mix is None:
                self._train(images, _int64(labels), total)
            else:
                self._train_mixed(images, _int64(labels), total, _int64(mix.partner_labels), np.float32(mix.lam))
        self._count += len(labels)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr.assign(lr)  # a variable read inside the compiled step: no retrace

    def learning_rate(self) -> float:
        return float(self.optimizer.lr.numpy())

    def train_metrics(self) -> Tuple[float, float, int]:
        count = self._count
        loss, correct = float(self._loss_sum.numpy()), int(self._correct.numpy())  # the sync
        self._loss_sum.assign(0.0)
        self._correct.assign(0)
        self._count = 0
        return mean_metrics(loss, correct, count)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return self._predict(images).numpy().astype(np.float32, copy=False)

    def get_weights(self) -> Dict[str, np.ndarray]:
        return read_canonical(self.model, LAYOUT, self.net.variables.by_name, lambda var: var.numpy())

    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        write_canonical(self.model, LAYOUT, self.net.variables.by_name, weights, assign_reshaped)

    def get_training_state(self) -> Dict[str, np.ndarray]:
        """Optimizer slots (canonical layout, PyTorch's slot names) and random-generator states."""
        state = optimizer_state(self.model, self.optimizer, self.net.variables.trainable_names)
        state.update(self.net.random_state())
        if self.loss_scale is not None:
            state.update(self.loss_scale.state())
        return state

    def set_training_state(self, state: Dict[str, np.ndarray]) -> None:
        set_optimizer_state(self.model, self.optimizer, self.net.variables.trainable_names, state)
        self.net.set_random_state(state)
        if self.loss_scale is not None:
            self.loss_scale.set_state(state)

    @property
    def trainable_variables(self) -> List[tf.Variable]:
        return list(self.net.variables.trainable)


def create_runner(model, optimizer, options, device, seed, mean, std, label_smoothing: float = 0.0,
                  precision: str = "fp32") -> TensorFlowRunner:
    """The backend's entry point (see :func:`cnnrun.backends.create_runner`)."""
    return TensorFlowRunner(model, optimizer, options, device, seed, mean, std, label_smoothing=label_smoothing,
                            precision=precision)
