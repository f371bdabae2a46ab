"""PyTorch backend: an ``nn.Module`` per compiled layer, NCHW (channels_last memory by default)."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnrun.backends import BACKENDS, mean_metrics
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
from cnnrun.data.rows import row_chunks
from cnnrun.spec import CompiledLayer, CompiledModel
from cnnrun.spec.layers import ELU_ALPHA, LEAKY_RELU_SLOPE

LAYOUT = BACKENDS["torch"].layout  # CHANNELS_FIRST


def framework_version() -> str:
    return torch.__version__


def _activation(name: str) -> nn.Module:
    return {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "elu": lambda: nn.ELU(alpha=ELU_ALPHA),
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE),
        "relu6": nn.ReLU6,
        "gelu": lambda: nn.GELU(approximate="none"),  # the exact erf form
        "swish": nn.SiLU,
        "hard_swish": nn.Hardswish,  # x·relu6(x + 3)/6
    }[name]()


def _torch_pad(pads) -> Tuple[int, int, int, int]:
    (top, bottom), (left, right) = pads
    return (left, right, top, bottom)


def _conv2d(layer: CompiledLayer, out_channels: int, groups: int, bias: bool) -> Tuple[nn.Conv2d, object]:
    """The layer's window as an nn.Conv2d, and the F.pad amounts to apply before it (None when it pads itself).

    nn.Conv2d pads symmetrically; uneven 'same' padding (TF puts the extra cell after) is applied by F.pad.
    """
    spec = layer.spec
    (top, bottom), (left, right) = layer.pads
    symmetric = top == bottom and left == right
    conv = nn.Conv2d(layer.in_shape[0], out_channels, spec.kernel, stride=spec.stride,
                     padding=(top, left) if symmetric else 0, dilation=spec.dilation, groups=groups, bias=bias)
    return conv, None if symmetric else _torch_pad(layer.pads)


class Conv(nn.Module):
    def __init__(self, layer: CompiledLayer):
        super().__init__()
        spec = layer.spec
        self.conv, self.pad = _conv2d(layer, spec.filters, spec.groups, spec.bias)
        self.act = _activation(spec.activation)

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.conv(x))


class DepthwiseConv(Conv):
    """A conv with one group per input channel: torch's weight (C·m, 1, kh, kw) is the canonical kernel."""

    def __init__(self, layer: CompiledLayer):
        nn.Module.__init__(self)
        spec = layer.spec
        channels = layer.in_shape[0]
        self.conv, self.pad = _conv2d(layer, channels * spec.depth_multiplier, channels, spec.bias)
        self.act = _activation(spec.activation)


class SeparableConv(nn.Module):
    """Depthwise (no bias) then a 1×1 conv with the layer's bias and activation."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        spec = layer.spec
        channels = layer.in_shape[0]
        middle = channels * spec.depth_multiplier
        self.depthwise, self.pad = _conv2d(layer, middle, channels, bias=False)
        self.pointwise = nn.Conv2d(middle, spec.filters, 1, bias=spec.bias)
        self.act = _activation(spec.activation)

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.pointwise(self.depthwise(x)))


class Upsample(nn.Module):
    """nearest: each cell repeated; bilinear: half-pixel centres, which is torch's align_corners=False."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size = tuple(layer.out_shape[1:])
        self.mode = layer.spec.interpolation

    def forward(self, x):
        if self.mode == "nearest":  # source cell ⌊(i + 0.5) / factor⌋ = ⌊i / factor⌋, far from rounding edges
            return F.interpolate(x, size=self.size, mode="nearest-exact")
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class MaxPool(nn.Module):
    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size, self.stride = layer.spec.size, layer.spec.strides
        self.pad = _torch_pad(layer.pads) if any(sum(p) for p in layer.pads) else None

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad, value=-math.inf)  # padded cells never win the max
        return F.max_pool2d(x, self.size, self.stride)


class AvgPool(nn.Module):
    """Averages real cells only: sum over zero-padded windows divided by each window's count of real cells."""

    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.size, self.stride = layer.spec.size, layer.spec.strides
        self.pad = _torch_pad(layer.pads) if any(sum(p) for p in layer.pads) else None
        if self.pad is not None:
            scale = torch.from_numpy(layer.real_cell_scale())[None, None]
            self.register_buffer("scale", scale, persistent=False)

    def forward(self, x):
        if self.pad is None:
            return F.avg_pool2d(x, self.size, self.stride)
        return F.avg_pool2d(F.pad(x, self.pad), self.size, self.stride) * self.scale


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    def forward(self, x):
        return x.amax(dim=(2, 3))


class Dense(nn.Module):
    def __init__(self, layer: CompiledLayer):
        super().__init__()
        self.linear = nn.Linear(layer.in_shape[0], layer.spec.units, bias=layer.spec.bias)
        self.act = _activation(layer.spec.activation)

    def forward(self, x):
        return self.act(self.linear(x))


def batchnorm(layer: CompiledLayer) -> nn.Module:
    cls = nn.BatchNorm2d if len(layer.in_shape) == 3 else nn.BatchNorm1d
    # cnnrun's momentum is Keras's (weight of the old running value); torch's is the weight of the new batch.
    return cls(layer.in_shape[0], eps=layer.spec.epsilon, momentum=1.0 - layer.spec.momentum)


class Residual(nn.Module):
    def __init__(self, layer: CompiledLayer, ctx: BuildContext):
        super().__init__()
        self.body = nn.Sequential(*[ctx.build(child) for child in layer.body])
        self.shortcut = nn.Sequential(*[ctx.build(child) for child in layer.shortcut])  # empty: the identity
        self.act = _activation(layer.spec.activation)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


def _conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    module = Conv(layer)
    return Built(module, attribute_handles(module.conv, kernel="weight", bias="bias"))  # OIHW: canonical


def _depthwise_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    module = DepthwiseConv(layer)
    return Built(module, attribute_handles(module.conv, kernel="weight", bias="bias"))  # (C·m, 1, kh, kw): canonical


def _separable_conv(layer: CompiledLayer, ctx: BuildContext) -> Built:
    module = SeparableConv(layer)
    return Built(module, {**attribute_handles(module.depthwise, depthwise_kernel="weight"),
                          **attribute_handles(module.pointwise, pointwise_kernel="weight", bias="bias")})


def _dense(layer: CompiledLayer, ctx: BuildContext) -> Built:
    module = Dense(layer)
    return Built(module, attribute_handles(module.linear, kernel="weight", bias="bias"))  # (out, in): canonical


def _batchnorm(layer: CompiledLayer, ctx: BuildContext) -> Built:
    module = batchnorm(layer)
    return Built(module, attribute_handles(module, gamma="weight", beta="bias", moving_mean="running_mean",
                                  moving_variance="running_var"))


# One builder per layer type, keyed like cnnrun.spec.LAYER_TYPES: (layer, ctx) → Built(module, tensors).
BUILDERS = {
    "conv2d": _conv,
    "depthwise_conv2d": _depthwise_conv,
    "separable_conv2d": _separable_conv,
    "maxpool": lambda layer, ctx: Built(MaxPool(layer)),
    "avgpool": lambda layer, ctx: Built(AvgPool(layer)),
    "global_avgpool": lambda layer, ctx: Built(GlobalAvgPool()),
    "global_maxpool": lambda layer, ctx: Built(GlobalMaxPool()),
    "upsample": lambda layer, ctx: Built(Upsample(layer)),
    "flatten": lambda layer, ctx: Built(nn.Flatten()),  # NCHW → C·H·W order, the canonical one
    "dense": _dense,
    "dropout": lambda layer, ctx: Built(nn.Dropout(layer.spec.rate)),
    "batchnorm": _batchnorm,
    "activation": lambda layer, ctx: Built(_activation(layer.spec.fn)),
    "softmax": lambda layer, ctx: Built(nn.Identity()),  # fused into the loss; predictions apply it
    "residual": lambda layer, ctx: Built(Residual(layer, ctx)),
}


class Network(nn.Module):
    """The compiled model; :attr:`tensors` maps canonical tensor names to the torch tensors holding them."""

    def __init__(self, model: CompiledModel):
        super().__init__()
        ctx = BuildContext(BUILDERS)
        self.layers = nn.Sequential(*[ctx.build(layer) for layer in model.layers])
        self._slots: Dict[str, Tuple[nn.Module, str]] = ctx.tensors

    def forward(self, x):
        for layer in self.layers:  # not Sequential.__call__: its wrapper costs Python time on every step
            x = layer(x)
        return x

    @property
    def tensors(self) -> Dict[str, torch.Tensor]:
        """canonical tensor name → the torch parameter or buffer holding it now.

        Looked up on every call: ``Module.to(device)`` keeps parameter objects but replaces buffers (batchnorm
        running statistics) with new tensors, so references taken before the move would be stale copies.
        """
        return {name: getattr(module, attribute) for name, (module, attribute) in self._slots.items()}


def resolve_device(device) -> torch.device:
    """cpu / cuda / cuda:N / auto → a torch.device that really works, or a UserError that says why not."""
    usable = torch.cuda.is_available()
    index = gpu_index(device, torch.cuda.device_count() if usable else 0, "PyTorch",
                      f"PyTorch sees no usable CUDA GPU (torch {torch.__version__}, "
                      f"built with CUDA {torch.version.cuda or 'none'}); use device=cpu or device=auto")
    return torch.device("cpu") if index is None else torch.device("cuda", index)


def set_tf32(enabled: bool) -> None:
    """Choose TF32 or IEEE float32 for cuDNN convolutions and cuBLAS matmuls (process-wide, as torch keeps it).

    PyTorch's default runs convolutions in TF32 on Ampere and newer GPUs, which moves outputs by ~1e-3 from
    what the other frameworks compute; cnnrun defaults to IEEE float32 so one spec means the same numbers.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the legacy flags must not be mixed in
        precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


class CopyStream:
    """Host batches copied to a CUDA device ahead of their step: called on the prefetch thread, each copy runs on a
    stream of its own from page-locked memory, so it overlaps the step the GPU is computing, and the tensor is
    handed over complete. ``record_stream`` keeps the allocator from reusing its memory until the training
    stream's work queued before it is freed has run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.compute = torch.cuda.current_stream(device)  # the training thread's stream

    def __call__(self, array) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            tensor = torch.from_numpy(array).pin_memory().to(self.device, non_blocking=True)
        tensor.record_stream(self.compute)
        self.stream.synchronize()  # this copy only: the training stream goes on meanwhile
        return tensor


def stager(device: torch.device):
    """What ``Runner.stage`` does on ``device``: a side-stream copy on CUDA; on the CPU nothing (a NumPy batch
    becomes a tensor without a copy when its step runs)."""
    return CopyStream(device) if device.type == "cuda" else _unchanged


def _unchanged(array):
    return array


def to_device(array, device: torch.device) -> torch.Tensor:
    """A batch on ``device``: a NumPy batch is copied (from page-locked memory on CUDA, so the copy is an
    asynchronous DMA, not a staged one); a tensor already held there (:func:`hold`, gathered) is used as it is."""
    if isinstance(array, torch.Tensor):
        return array
    source = torch.from_numpy(array)
    if device.type == "cuda":
        source = source.pin_memory()
    return source.to(device, non_blocking=True)


def hold(array, device: torch.device) -> torch.Tensor:
    """``array`` (an array or a memory-mapped split) copied onto ``device`` once, a bounded chunk at a time, so
    the host never holds a second copy of a large split."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, device=device)
    for rows, chunk in row_chunks(array):
        out[rows].copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
    return out


def gather(held: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return held.index_select(0, index)


def free_memory(device: torch.device):
    """Bytes free on a CUDA device; None on the CPU (no memory of its own to run out of)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class MixedPrecision:
    """``trainer.precision`` in PyTorch: autocast regions and, for fp16, loss scaling with torch.amp.GradScaler.

    Autocast runs convolutions and matmuls in bfloat16/float16 and keeps the parameters (and so the optimizer's
    update and the checkpoints) in float32; batchnorm keeps float32 statistics. The loss is computed outside
    the region on float32 logits. Also the precision of Keras on the torch backend (its own dtype policy casts
    the layers; this class scales its fp16 loss).
    """

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, precision: str, device: torch.device):
        from cnnrun.precision import INITIAL_LOSS_SCALE, LOSS_SCALE_GROWTH_INTERVAL

        self.dtype = self.DTYPES.get(precision)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=INITIAL_LOSS_SCALE, growth_interval=LOSS_SCALE_GROWTH_INTERVAL
        ) if precision == "fp16" else None

    def autocast(self):
        if self.dtype is None:  # float32: entering a disabled autocast region still costs Python time per step
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss, optimizer, clip_norm) -> None:
        """Backward pass and update; with loss scaling, a step whose gradients overflowed is skipped."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip_norm:
                clip_gradients(optimizer, clip_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_norm:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            clip_gradients(optimizer, clip_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> Dict[str, np.ndarray]:
        """The loss scale and its count of finite steps, for exact resume (empty without loss scaling)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return {}
        saved = self.scaler.state_dict()
        if not saved:  # no step taken yet: nothing to restore
            return {}
        return {"loss_scale/scale": np.asarray(saved["scale"], np.float32),
                "loss_scale/growth_tracker": np.asarray(saved["_growth_tracker"], np.int64)}

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        if self.scaler is not None and "loss_scale/scale" in state:
            self.scaler.load_state_dict({
                **self.scaler.state_dict(), "scale": float(state["loss_scale/scale"]),
                "_growth_tracker": int(state["loss_scale/growth_tracker"]),
            })


class OnTorchDevice:
    """What every runner on a torch device shares, whatever builds its model (cnnrun's modules here, Keras's torch
    backend in :mod:`cnnrun.backends.keras_torch`): the device and its settings, batches from the host or held on
    the device, the running metrics and the optimizer's learning rate. A subclass calls :meth:`_use_device` before
    it builds anything (it seeds torch) and sets ``self.optimizer``."""

    def _use_device(self, device, seed: int, tf32: bool, cudnn_benchmark: bool) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            set_tf32(tf32)
            torch.backends.cudnn.benchmark = cudnn_benchmark  # process-wide, as torch keeps it
        if self.device.type == "cpu" and device.threads:
            torch.set_num_threads(device.threads)
        torch.manual_seed(seed)
        self.stage = stager(self.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.device_name = f"{self.device} ({name})" if self.device.type == "cuda" else "cpu"
        self._zero_metrics()

    def _normalisation(self, mean, std, shape) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) on the device, shaped to broadcast over a batch of ``shape``'s layout."""
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).reshape(shape)
        return mean_t, (1.0 / torch.tensor(std, dtype=torch.float32, device=self.device)).reshape(shape)

    def hold(self, array) -> torch.Tensor:
        return hold(array, self.device)

    gather = staticmethod(gather)

    def device_memory(self):
        return free_memory(self.device)

    def _zero_metrics(self) -> None:
        # float64 sums: an interrupted-and-resumed epoch adds the same numbers in another grouping.
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._count = 0

    def _count_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a step's loss and correct predictions where they were computed: nothing waits for the device (and
        nothing needs no_grad: a detached loss and an argmax record no graph)."""
        self._loss_sum.add_(loss.detach(), alpha=len(labels))  # in float64: one kernel, no temporaries
        self._correct.add_((logits.argmax(1) == labels).sum())
        self._count += len(labels)

    def train_metrics(self) -> Tuple[float, float, int]:
        count = self._count
        loss, correct = float(self._loss_sum), int(self._correct)  # the sync
        self._zero_metrics()
        return mean_metrics(loss, correct, count)

    def set_learning_rate(self, lr: float) -> None:
        set_torch_learning_rate(self.optimizer, lr)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class TorchRunner(OnTorchDevice):
    def __init__(self, model: CompiledModel, optimizer, options, device, seed: int, mean, std,
                 label_smoothing: float = 0.0, precision: str = "fp32"):
        from cnnrun.spec.init import initial_weights

        self.model = model
        self._use_device(device, seed, options.tf32, options.cudnn_benchmark)
        self.precision = MixedPrecision(precision, self.device)
        self.net = Network(model)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        self.net.to(self.device, memory_format=self.memory_format)
        self.set_weights(initial_weights(model, seed))
        self.mean, self.inv_std = self._normalisation(mean, std, (1, len(mean), 1, 1))
        self.optimizer = make_optimizer(list(self.net.parameters()), optimizer, fused=options.fused_optimizer)
        self.clip_norm = optimizer.clip_norm
        self.label_smoothing = label_smoothing
        self.forward = torch.compile(self.net) if options.compile else self.net

    def _inputs(self, images) -> torch.Tensor:
        x = to_device(images, self.device)
        # (N, H, W, C) uint8 viewed as NCHW: the permuted view is already channels_last in memory.
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        return x.contiguous(memory_format=self.memory_format)

    def _mode(self, training: bool) -> None:
        # Module.train walks every submodule: per step that is Python time a GPU step cannot hide, so only on change
        if self.net.training is not training:
            self.net.train(training)

    def train_step(self, images: np.ndarray, labels: np.ndarray, mix=None) -> None:
        self._mode(True)
        x = self._inputs(images)
        y = to_device(labels, self.device)
        with self.precision.autocast():
            logits = self.forward(x)
        loss = cross_entropy(logits.float(), y, self.label_smoothing, mix)  # softmax and loss in float32
        self.precision.step(loss, self.optimizer, self.clip_norm)
        self._count_step(loss, logits, y)

    @torch.no_grad()
    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        self._mode(False)
        with self.precision.autocast():
            logits = self.forward(self._inputs(images))
        return logits.float().cpu().numpy()

    def get_weights(self) -> Dict[str, np.ndarray]:
        return read_canonical(self.model, LAYOUT, self.net.tensors, lambda t: t.detach().cpu().numpy())

    @torch.no_grad()
    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        write_canonical(self.model, LAYOUT, self.net.tensors, weights,
                        lambda tensor, value: tensor.copy_(torch.from_numpy(value).reshape(tensor.shape)))

    def get_training_state(self) -> Dict[str, np.ndarray]:
        """Optimizer slots per parameter (``<tensor>/exp_avg`` …) and the RNG states that drive dropout."""
        names = {id(t): n for n, t in self.net.tensors.items()}
        state: Dict[str, np.ndarray] = {"rng/torch_cpu": torch.get_rng_state().numpy()}
        if self.device.type == "cuda":
            state["rng/torch_cuda"] = torch.cuda.get_rng_state(self.device).numpy()
        for param, slots in self.optimizer.state.items():
            for slot, value in slots.items():
                state[slot_key(names[id(param)], slot)] = value.detach().cpu().numpy()
        state.update(self.precision.state())
        return state

    @torch.no_grad()
    def set_training_state(self, state: Dict[str, np.ndarray]) -> None:
        if "rng/torch_cpu" in state:
            torch.set_rng_state(torch.from_numpy(state["rng/torch_cpu"].copy()))
        if "rng/torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(state["rng/torch_cuda"].copy()), self.device)
        self.precision.set_state(state)
        tensors = self.net.tensors
        for name, slots in slots_by_tensor(state, tensors).items():
            param = tensors[name]
            self.optimizer.state[param] = {slot: self._slot_tensor(param, v) for slot, v in slots.items()}

    def _slot_tensor(self, param: torch.Tensor, value: np.ndarray) -> torch.Tensor:
        """A restored optimizer slot; those shaped like the parameter share its memory format (fused kernels
        walk both with the same strides, so a contiguous slot beside a channels_last weight would be misread)."""
        source = torch.from_numpy(np.ascontiguousarray(value))
        if tuple(source.shape) != tuple(param.shape):
            return source.to(self.device)  # e.g. Adam's scalar step count
        return torch.empty_like(param).copy_(source)


def make_optimizer(params, cfg, fused: bool):
    """The optimizer config → torch.optim with every hyperparameter stated (fused kernels where torch has them).

    Also the optimizer of Keras on the torch backend, so both run the same update.
    """
    fused = bool(fused)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   fused=fused)
    if cfg.name == "rmsprop":  # torch has no fused RMSprop kernel
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, fused=fused
    )


def cross_entropy(logits, labels, label_smoothing: float, mix=None):
    """The training loss: softmax cross-entropy with torch's label smoothing; for a mixup/cutmix batch,
    λ·CE(labels) + (1 − λ)·CE(partner labels). Also the loss of Keras on the torch backend."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if mix is None:
        return loss
    partners = torch.from_numpy(mix.partner_labels).to(labels.device, non_blocking=True)
    return mix.lam * loss + (1.0 - mix.lam) * F.cross_entropy(logits, partners, label_smoothing=label_smoothing)


def clip_gradients(optimizer, max_norm: float) -> None:
    """Scale every gradient by min(1, max_norm / (global norm + 1e-6)): the formula every backend uses."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def set_torch_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def create_runner(model, optimizer, options, device, seed, mean, std, label_smoothing: float = 0.0,
                  precision: str = "fp32") -> TorchRunner:
    return TorchRunner(model, optimizer, options, device, seed, mean, std, label_smoothing, precision)
