"""Chainer backend: a ``chainer.Chain`` per compiled layer, NCHW, on NumPy (CPU) or CuPy (CUDA).

Chainer's own window conventions differ from cnnrun's (TensorFlow's) and are never relied on where they differ:
its convolutions and poolings pad symmetrically, max pooling defaults to ``cover_all=True`` (partial windows)
and average pooling divides padded windows by the full window area. So symmetric padding uses the function's
own ``pad`` (identical results, no copy), uneven padding is applied explicitly with ``F.pad`` (-inf for max
pooling), ``cover_all=False`` everywhere, and average pooling rescales by a precomputed map of real cells.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from cnnrun.backends import BACKENDS, check_precision, mean_metrics
from cnnrun.backends.building import (
    BuildContext,
    Built,
    attribute_handles,
    read_canonical,
    slot_key,
    slots_by_tensor,
    write_canonical,
)
from cnnrun.backends.devices import gpu_index
from cnnrun.backends.chainer_env import (
    CUDA_EXTRA_HINT,
    cudnn_min_epsilon,
    cudnn_usable,
    cupy_status,
    gpu_count,
    gpu_name,
    import_chainer,
    limit_cpu_threads,
)
from cnnrun.data.rows import row_chunks
from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE

chainer = import_chainer()
import chainer.functions as F  # noqa: E402  (after the environment fix above)
import chainer.links as L  # noqa: E402

from cnnrun.backends.chainer_optim import TorchLikeOptimizer  # noqa: E402
from cnnrun.backends.chainer_precision import Mixed16  # noqa: E402

LAYOUT = BACKENDS["chainer"].layout  # CHANNELS_FIRST
NOISE_STATE = "rng/chainer_dropout"  # training-state key of the dropout generator's counter
_CURAND_PHILOX = 161  # cuRAND's CURAND_RNG_PSEUDO_PHILOX4_32_10 (a stable C enum value; CuPy's module path moved)
_CUPY_VERSION: Optional[str] = None  # set once a runner really uses CuPy; part of framework_version()


def framework_version() -> str:
    """Chainer's version, plus CuPy's when a runner in this process runs on CUDA."""
    if _CUPY_VERSION:
        return f"{chainer.__version__} (CuPy {_CUPY_VERSION})"
    return chainer.__version__


def _activation(name: str):
    return {
        "linear": lambda x: x,
        "relu": F.relu,
        "tanh": F.tanh,
        "sigmoid": F.sigmoid,
        "elu": partial(F.elu, alpha=ELU_ALPHA),
        "leaky_relu": partial(F.leaky_relu, slope=LEAKY_RELU_SLOPE),
        "relu6": partial(F.clipped_relu, z=6.0),
        "gelu": _gelu,
        "swish": lambda x: x * F.sigmoid(x),  # F.swish has a trainable β; this is β = 1
        "hard_swish": lambda x: x * F.clipped_relu(x + 3.0, z=6.0) * (1.0 / 6.0),
    }[name]


def _gelu(x):
    """The exact form x·(1 + erf(x/√2))/2 (Chainer has no GELU of its own)."""
    return 0.5 * x * (1.0 + F.erf(x * np.float32(1.0 / np.sqrt(2.0))))


def _symmetric(pads) -> bool:
    (top, bottom), (left, right) = pads
    return top == bottom and left == right


def _pad_width(pads) -> Tuple[Tuple[int, int], ...]:
    """cnnrun's ((top, bottom), (left, right)) as a pad_width for an NCHW array."""
    return ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1]))


class Fn(chainer.Link):
    """A parameterless layer (activation, flatten, pooling without padding, ...) as a Link, for ChainList."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _convolution(layer: CompiledLayer, out_channels: int, groups: int, bias: bool):
    """The layer's window as an L.Convolution2D (OIHW weights: canonical), and the F.pad width to apply before
    it (None when its own symmetric padding is the compiled one)."""
    spec = layer.spec
    symmetric = _symmetric(layer.pads)
    conv = L.Convolution2D(
        layer.in_shape[0],
        out_channels,
        spec.kernel,
        stride=spec.stride,
        pad=(layer.pads[0][0], layer.pads[1][0]) if symmetric else 0,
        nobias=not bias,
        initialW=chainer.initializers.Zero(),  # cnnrun sets the shared initial weights afterwards
        dilate=spec.dilation,
        groups=groups,
    )
    return conv, None if symmetric else _pad_width(layer.pads)


class Conv(chainer.Chain):
    """conv2d: L.Convolution2D with its own symmetric padding, or F.pad first when the padding is uneven."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        spec = layer.spec
        with self.init_scope():
            self.conv, self.pad_width = _convolution(layer, spec.filters, spec.groups, spec.bias)
        self.act = _activation(spec.activation)

    def forward(self, x):
        if self.pad_width is not None:
            x = F.pad(x, self.pad_width, "constant")
        return self.act(self.conv(x))


class DepthwiseConv(Conv):
    """depthwise_conv2d as a convolution with one group per input channel: its (C·m, 1, kh, kw) weight is the
    canonical kernel (L.DepthwiseConvolution2D holds another layout)."""

    def __init__(self, layer: CompiledLayer):
        chainer.Chain.__init__(self)
        spec = layer.spec
        channels = layer.in_shape[0]
        with self.init_scope():
            self.conv, self.pad_width = _convolution(layer, channels * spec.depth_multiplier, channels, spec.bias)
        self.act = _activation(spec.activation)


class SeparableConv(chainer.Chain):
    """separable_conv2d: the depthwise convolution (no bias), then a 1×1 one with the bias and activation."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        spec = layer.spec
        channels = layer.in_shape[0]
        middle = channels * spec.depth_multiplier
        with self.init_scope():
            self.depthwise, self.pad_width = _convolution(layer, middle, channels, bias=False)
            self.pointwise = L.Convolution2D(middle, spec.filters, 1, nobias=not spec.bias,
                                             initialW=chainer.initializers.Zero())
        self.act = _activation(spec.activation)

    def forward(self, x):
        if self.pad_width is not None:
            x = F.pad(x, self.pad_width, "constant")
        return self.act(self.pointwise(self.depthwise(x)))


class Upsample(chainer.Link):
    """nearest: each cell repeated. bilinear: products with (out, in) interpolation matrices per axis, built
    with half-pixel centres (F.resize_images is not used: on NumPy >= 1.24 it fails on ``numpy.float``)."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size, self.bilinear = layer.spec.size, layer.spec.interpolation == "bilinear"
        _, h, w = layer.in_shape
        # Persistents move with the link to the GPU; they are not weights (the tensor index never lists them).
        self.add_persistent("rows", _bilinear_matrix(h, self.size[0]) if self.bilinear else None)
        self.add_persistent("cols_t", _bilinear_matrix(w, self.size[1]).T.copy() if self.bilinear else None)

    def forward(self, x):
        if not self.bilinear:
            return F.repeat(F.repeat(x, self.size[0], axis=2), self.size[1], axis=3)
        n, c, h, w = x.shape
        cols_t, rows = self.cols_t.astype(x.dtype, copy=False), self.rows.astype(x.dtype, copy=False)  # mixed16
        y = F.matmul(F.reshape(x, (n * c * h, w)), cols_t)  # along W: (N·C·H, OW)
        y = F.transpose(F.reshape(y, (n, c, h, -1)), (0, 1, 3, 2))  # (N, C, OW, H)
        ow = y.shape[2]
        y = F.matmul(F.reshape(y, (n * c * ow, h)), rows.T)  # along H: (N·C·OW, OH)
        return F.transpose(F.reshape(y, (n, c, ow, -1)), (0, 1, 3, 2))


def _bilinear_matrix(n: int, factor: int) -> np.ndarray:
    """(n·factor, n) float32: output cell i samples (i + 0.5)/factor − 0.5, clamped to [0, n − 1], linearly
    between its two neighbouring cells."""
    source = np.maximum((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), n - 1)
    high = np.minimum(low + 1, n - 1)
    frac = source - low
    matrix = np.zeros((n * factor, n))
    np.add.at(matrix, (np.arange(n * factor), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n * factor), high), frac)
    return matrix.astype(np.float32)


class MaxPool(chainer.Link):
    """maxpool without partial windows (cover_all=False); padded cells are -inf."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size, self.stride = layer.spec.size, layer.spec.strides
        symmetric = _symmetric(layer.pads)
        # Chainer's own padding for max pooling is -inf, the same as cnnrun's; uneven padding goes through F.pad.
        self.pad = (layer.pads[0][0], layer.pads[1][0]) if symmetric else (0, 0)
        self.pad_width = None if symmetric else _pad_width(layer.pads)

    def forward(self, x):
        if self.pad_width is not None:
            x = F.pad(x, self.pad_width, "constant", constant_values=-np.inf)  # padded cells never win
        return F.max_pooling_2d(x, self.size, self.stride, pad=self.pad, cover_all=False)


class AvgPool(chainer.Link):
    """Averages real cells only: Chainer's average (padded zeros over the full window area) times area/count."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size, self.stride = layer.spec.size, layer.spec.strides
        symmetric = _symmetric(layer.pads)
        self.pad = (layer.pads[0][0], layer.pads[1][0]) if symmetric else (0, 0)
        self.pad_width = None if symmetric else _pad_width(layer.pads)
        # A persistent moves with the link to the GPU; it is not a weight (the tensor index never lists it).
        scale = layer.real_cell_scale()
        self.add_persistent("scale", None if scale is None else scale[None, None])

    def forward(self, x):
        if self.pad_width is not None:
            x = F.pad(x, self.pad_width, "constant")
        y = F.average_pooling_2d(x, self.size, self.stride, pad=self.pad)
        return y if self.scale is None else y * F.broadcast_to(self.scale.astype(y.dtype, copy=False), y.shape)


class Dense(chainer.Chain):
    """dense: L.Linear, whose (out, in) weight is the canonical layout."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        with self.init_scope():
            self.linear = L.Linear(
                layer.in_shape[0], layer.spec.units, nobias=not layer.spec.bias, initialW=chainer.initializers.Zero()
            )
        self.act = _activation(layer.spec.activation)

    def forward(self, x):
        return self.act(self.linear(x))


class BatchNorm(L.BatchNormalization):
    """Keras's momentum is Chainer's decay (both weigh the old running value); running var is unbiased in both
    Chainer and PyTorch. cuDNN refuses an epsilon below its minimum, so such layers run Chainer's own kernels."""

    def __init__(self, layer: CompiledLayer):
        super().__init__(layer.in_shape[0], decay=layer.spec.momentum, eps=layer.spec.epsilon)

    def forward(self, x, **kwargs):
        if self.eps >= cudnn_min_epsilon():
            return super().forward(x, **kwargs)
        with chainer.using_config("use_cudnn", "never"):
            return super().forward(x, **kwargs)


class Dropout(chainer.Link):
    """Dropout with the runner's seeded generator (Chainer's own draws from NumPy's global RNG)."""

    def __init__(self, layer: CompiledLayer, noise: "Noise"):
        super().__init__()
        self.rate, self.noise = layer.spec.rate, noise

    def forward(self, x):
        if not chainer.config.train or self.rate == 0.0:
            return x
        keep = self.noise.uniform(x.shape, chainer.backend.get_array_module(x)) >= self.rate
        mask = keep.astype(x.dtype)  # float16 under mixed16
        mask *= x.dtype.type(1.0 / (1.0 - self.rate))
        return F.dropout(x, self.rate, mask=mask)


class Residual(chainer.Chain):
    """activation(body(x) + shortcut(x)); the shortcut's layers come from the compiler (none: the identity)."""

    def __init__(self, layer: CompiledLayer, ctx: BuildContext):
        super().__init__()
        with self.init_scope():
            self.body = chainer.ChainList(*[ctx.build(child) for child in layer.body])
            self.shortcut = chainer.ChainList(*[ctx.build(child) for child in layer.shortcut])
        self.act = _activation(layer.spec.activation)

    def forward(self, x):
        y, shortcut = x, x
        for link in self.body:
            y = link(y)
        for link in self.shortcut:
            shortcut = link(shortcut)
        return self.act(y + shortcut)


def _flatten(x):
    return F.reshape(x, (x.shape[0], -1))  # NCHW → C·H·W order, the canonical one


def _global_avgpool(x):
    return F.mean(x, axis=(2, 3))


def _global_maxpool(x):
    return F.max(x, axis=(2, 3))


def _conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    link = Conv(layer)
    return Built(link, attribute_handles(link.conv, kernel="W", bias="b"))  # OIHW: canonical


def _depthwise_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    link = DepthwiseConv(layer)
    return Built(link, attribute_handles(link.conv, kernel="W", bias="b"))  # (C·m, 1, kh, kw): canonical


def _separable_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    link = SeparableConv(layer)
    return Built(link, {**attribute_handles(link.depthwise, depthwise_kernel="W"),
                        **attribute_handles(link.pointwise, pointwise_kernel="W", bias="b")})


def _dense(layer: CompiledLayer, ctx: BuildContext) -> Built:
    link = Dense(layer)
    return Built(link, attribute_handles(link.linear, kernel="W", bias="b"))  # (out, in): canonical


def _batchnorm(layer: CompiledLayer, ctx: BuildContext) -> Built:
    link = BatchNorm(layer)
    return Built(link, attribute_handles(link, gamma="gamma", beta="beta", moving_mean="avg_mean",
                                         moving_variance="avg_var"))


# One builder per layer type, keyed like cnnrun.spec.LAYER_TYPES: (layer, ctx) → Built(link, tensors);
# ``ctx.noise`` is the dropout generator.
BUILDERS = {
    "conv2d": _conv,
    "depthwise_conv2d": _depthwise_conv,
    "separable_conv2d": _separable_conv,
    "maxpool": lambda layer, ctx: Built(MaxPool(layer)),
    "avgpool": lambda layer, ctx: Built(AvgPool(layer)),
    "global_avgpool": lambda layer, ctx: Built(Fn(_global_avgpool)),
    "global_maxpool": lambda layer, ctx: Built(Fn(_global_maxpool)),
    "upsample": lambda layer, ctx: Built(Upsample(layer)),
    "flatten": lambda layer, ctx: Built(Fn(_flatten)),
    "dense": _dense,
    "dropout": lambda layer, ctx: Built(Dropout(layer, ctx.noise)),
    "batchnorm": _batchnorm,
    "activation": lambda layer, ctx: Built(Fn(_activation(layer.spec.fn))),
    "softmax": lambda layer, ctx: Built(Fn(lambda x: x)),  # fused into the loss; predictions apply it
    "residual": lambda layer, ctx: Built(Residual(layer, ctx)),
}


class Noise:
    """Seeded random numbers for dropout masks, on whichever device the arrays live.

    Counter-based: draw number ``k`` comes from a generator keyed by (seed, k), so the whole state is one
    counter, which the training state carries; a resumed run draws the very masks the uninterrupted one would.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.draws = 0

    def uniform(self, shape, xp):
        """float32 uniform [0, 1) numbers of ``shape``, as a NumPy or CuPy array (``xp``)."""
        key = int(np.random.SeedSequence([self.seed, 104729, self.draws]).generate_state(1, np.uint64)[0])
        self.draws += 1
        if xp is np:
            return np.random.default_rng(key).random(shape, dtype=np.float32)
        # Philox: cheap to set up per draw, unlike cuRAND's default XORWOW state initialisation.
        return xp.random.RandomState(key >> 1, method=_CURAND_PHILOX).random_sample(shape, dtype=np.float32)


class Network(chainer.ChainList):
    """The compiled model; ``tensors`` maps canonical names to (link, attribute) holding each array."""

    def __init__(self, model: CompiledModel, noise: Noise):
        ctx = BuildContext(BUILDERS, noise=noise)
        super().__init__(*[ctx.build(layer) for layer in model.layers])
        self.tensors: Dict[str, Tuple[chainer.Link, str]] = ctx.tensors

    def forward(self, x):
        for link in self:
            x = link(x)
        return x

    def array(self, name: str):
        """The live array behind a canonical name (a parameter's data or a persistent)."""
        link, attr = self.tensors[name]
        value = getattr(link, attr)
        return value.array if isinstance(value, chainer.Variable) else value

    def param(self, name: str) -> Optional[chainer.Parameter]:
        link, attr = self.tensors[name]
        value = getattr(link, attr)
        return value if isinstance(value, chainer.Parameter) else None


def resolve_device(device):
    """cpu / cuda / cuda:N / auto → a Chainer device that really works, or a UserError that says why not."""
    if device.kind == "cpu":
        return chainer.get_device("@numpy")
    cupy, why = cupy_status()
    count, no_gpu = gpu_count(cupy) if cupy is not None else (0, why)
    if cupy is None:
        why_none = f"Chainer runs on CUDA GPUs through CuPy, and {why}; {CUDA_EXTRA_HINT}. Or use device=cpu"
    else:
        why_none = (f"CuPy {cupy.__version__} sees no usable CUDA GPU ({no_gpu}); "
                    "check the NVIDIA driver (nvidia-smi) or use device=cpu")
    index = gpu_index(device, count, "CuPy", why_none)
    if index is None:
        return chainer.get_device("@numpy")
    with warnings.catch_warnings():
        # "cuDNN is not enabled": said once in the device name ("cuDNN off") instead of as a warning.
        warnings.filterwarnings("ignore", message="cuDNN is not enabled")
        return chainer.get_device(f"@cupy:{index}")


class ChainerRunner:
    """The Runner protocol (see cnnrun.backends) for Chainer, on NumPy or CuPy arrays."""

    def __init__(self, model: CompiledModel, optimizer, options, device, seed: int, mean, std,
                 label_smoothing: float = 0.0, precision: str = "fp32"):
        from cnnrun.spec.init import initial_weights

        global _CUPY_VERSION
        self.model = model
        self.device = resolve_device(device)
        self.xp = self.device.xp
        check_precision("chainer", device, "cpu" if self.xp is np else "cuda", precision)
        self.precision = Mixed16(precision == "fp16")
        self._threads = limit_cpu_threads(device.threads) if self.xp is np else None
        self.noise = Noise(seed)
        with self.precision.build_scope():
            self.net = Network(model, self.noise)
        if self.xp is not np:
            self.device.use()
            self.net.to_device(self.device)
            _CUPY_VERSION = self.xp.__version__
        self.set_weights(initial_weights(model, seed))
        shape = (1, len(mean), 1, 1)
        self.mean = self.xp.asarray(np.asarray(mean, np.float32).reshape(shape))
        self.inv_std = self.xp.asarray((1.0 / np.asarray(std, np.float32)).reshape(shape))
        self.optimizer = TorchLikeOptimizer(optimizer).setup(self.net)
        self.precision.setup(self.optimizer)
        self.clip_norm = optimizer.clip_norm
        self.label_smoothing = label_smoothing
        self.use_cudnn = "auto" if (self.xp is not np and options.cudnn and cudnn_usable()) else "never"
        self.communicator = None  # a ChainerMN communicator once this process trains as one rank of several
        self.loss_weight = 1.0  # then: the factor on this rank's mean loss (cnnrun.distributed.shard.loss_weight)
        self._zero_metrics()
        if self.xp is np:
            self.device_name = "cpu"
        else:
            cudnn = "" if self.use_cudnn == "auto" else ", cuDNN off"
            index = self.device.device.id
            self.device_name = f"cuda:{index} ({gpu_name(self.xp, index)}{cudnn})"

    @contextlib.contextmanager
    def _config(self, train: bool) -> Iterator[None]:
        """Chainer's thread-local switches for one call: the device, mode, cuDNN, and no per-call type checks
        (the compiler already proved every shape, and the checks cost Python time on every function call)."""
        with chainer.using_device(self.device), chainer.using_config("train", train), \
                chainer.using_config("enable_backprop", train), chainer.using_config("use_cudnn", self.use_cudnn), \
                chainer.using_config("type_check", False):
            yield

    def _zero_metrics(self) -> None:
        # float64 sums: an interrupted-and-resumed epoch adds the same numbers in another grouping.
        self._loss_sum = self.xp.zeros((), np.float64)
        self._correct = self.xp.zeros((), np.int64)
        self._count = 0

    def hold(self, array):
        """``array`` (an array or a memory-mapped split) copied onto this runner's device once, a bounded chunk
        at a time (the host never holds a second copy of a large split)."""
        with chainer.using_device(self.device):
            out = self.xp.empty(array.shape, array.dtype)
            for rows, chunk in row_chunks(array):
                out[rows] = self.xp.asarray(chunk)
        return out

    def stage(self, array):
        """The host batch itself: Chainer copies it in the step (CuPy's memory pool reuses a block freed on
        another stream as soon as it is freed, so a side-stream copy could overwrite a batch a queued step still
        reads). A dataset held on the GPU (dataset.on_device) has no copies at all."""
        return array

    def gather(self, held, index):
        with chainer.using_device(self.device):
            return held.take(index, axis=0)

    def device_memory(self):
        """Bytes free on the GPU; None on the CPU."""
        if self.xp is np:
            return None
        with chainer.using_device(self.device):
            return self.xp.cuda.runtime.memGetInfo()[0]

    def _inputs(self, images):
        x = self.xp.asarray(images)  # a host batch: uint8 crosses to the GPU at a quarter of float32's size
        x = x.transpose(0, 3, 1, 2).astype(np.float32, order="C")
        x -= self.mean
        x *= self.inv_std
        return self.precision.inputs(x)

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        x = self._inputs(images)
        t = self.xp.asarray(labels.astype(np.int32, copy=False))
        with self._config(train=True):
            logits = self.precision.logits(self.net(x))
            loss = cross_entropy(logits, t, self.label_smoothing)
            if mix is not None:
                partners = self.xp.asarray(mix.partner_labels.astype(np.int32, copy=False))
                loss = mix.lam * loss + (1.0 - mix.lam) * cross_entropy(logits, partners, self.label_smoothing)
            self.net.cleargrads()
            if self.communicator is None:
                objective = loss
            else:  # weighted so that the mean over ranks of the gradients is the global batch's mean-loss gradient
                objective = loss * self.loss_weight
            self.precision.backward(objective, self.optimizer)
            self._update()
        # Accumulated where computed (device arrays): nothing here waits for the GPU.
        self._loss_sum += loss.array.astype(np.float64) * len(labels)
        self._correct += (logits.array.argmax(axis=1) == t).sum()
        self._count += len(labels)

    def _update(self) -> None:
        if self.communicator is not None:
            self.communicator.multi_node_mean_grad(self.net)
        if self.clip_norm:  # mixed16: the gradients are still scaled, so is the bound
            self.optimizer.clip_gradients(self.clip_norm * self.precision.loss_scale(self.optimizer))
        self.optimizer.update()  # mixed16: skips a step whose gradients overflowed, unscales the others

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.lr = lr

    def learning_rate(self) -> float:
        return float(self.optimizer.lr)

    def train_metrics(self) -> Tuple[float, float, int]:
        count = self._count
        loss, correct = float(self._loss_sum), int(self._correct)  # the sync
        self._zero_metrics()
        return mean_metrics(loss, correct, count)

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        with self._config(train=False):
            logits = self.net(self._inputs(images)).array
        return np.asarray(chainer.backend.CpuDevice().send(logits), dtype=np.float32)

    def get_weights(self) -> Dict[str, np.ndarray]:
        cpu = chainer.backend.CpuDevice()
        # Copies (np.array): on the CPU the live arrays would otherwise change under the caller as training goes on.
        return read_canonical(self.model, LAYOUT, {name: name for name in self.net.tensors},
                              lambda name: np.array(cpu.send(self._array(name)), np.float32))

    def _array(self, name: str):
        """A tensor's float32 values: the optimizer's master copy of a mixed16 parameter, else the array."""
        master = Mixed16.master(self.net.param(name))
        return self.net.array(name) if master is None else master.array

    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        def write(name, value):
            target = self.net.array(name)
            target[...] = self.xp.asarray(value).reshape(target.shape)  # in place: optimizer keeps its refs
            master = Mixed16.master(self.net.param(name))
            if master is not None:
                master.array[...] = self.xp.asarray(value).reshape(target.shape)  # what the update reads

        write_canonical(self.model, LAYOUT, {name: name for name in self.net.tensors}, weights, write)

    def get_training_state(self) -> Dict[str, np.ndarray]:
        """Optimizer slots per parameter (``<tensor>/exp_avg`` …) and the dropout generator's draw counter."""
        state: Dict[str, np.ndarray] = {NOISE_STATE: np.asarray([self.noise.draws], np.int64),
                                        **self.precision.state(self.optimizer)}
        for name in self.net.tensors:
            param = self.net.param(name)
            if param is not None and param.update_rule is not None:
                for slot, value in param.update_rule.export_state().items():
                    state[slot_key(name, slot)] = value
        return state

    def set_training_state(self, state: Dict[str, np.ndarray]) -> None:
        if NOISE_STATE in state:
            self.noise.draws = int(state[NOISE_STATE][0])
        self.precision.set_state(self.optimizer, state)
        for name, slots in slots_by_tensor(state, self.net.tensors).items():
            param = self.net.param(name)
            if param is not None:
                param.update_rule.import_state(slots, param)


def cross_entropy(logits, labels, label_smoothing: float):
    """Mean softmax cross-entropy; with label smoothing ε, PyTorch's (1-ε)·(-log p_label) + ε·mean(-log p)."""
    if not label_smoothing:
        return F.softmax_cross_entropy(logits, labels)
    log_p = F.log_softmax(logits)
    nll = -F.select_item(log_p, labels)
    uniform = -F.mean(log_p, axis=1)
    return F.mean((1.0 - label_smoothing) * nll + label_smoothing * uniform)


def create_runner(model, optimizer, options, device, seed, mean, std, label_smoothing: float = 0.0,
                  precision: str = "fp32") -> ChainerRunner:
    """Build ``model`` in Chainer on ``device`` with cnnrun's initial weights and the torch-equivalent optimizer."""
    return ChainerRunner(model, optimizer, options, device, seed, mean, std, label_smoothing, precision)
