"""Conversions between cnnrun's canonical weight layout and each framework's, in one place.

Canonical (what checkpoints hold, and what PyTorch and Chainer use natively):
- conv kernel OIHW; dense kernel (out, in); biases and batchnorm vectors (C,);
- a vector made by ``flatten`` is in C·H·W order, so the dense (or batchnorm) after it indexes features that way.

Channels-last frameworks (TensorFlow, Keras) hold conv kernels HWIO (a grouped conv's (kh, kw, in/groups, out),
the same transpose), depthwise kernels (kh, kw, C, m) where canonical is (C·m, 1, kh, kw), dense kernels
(in, out), and flatten an H×W×C map in H·W·C order; for a layer fed by a flatten, the feature axis is permuted
between the two orders.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from cnnrun.spec import CompiledModel

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"


def _hwc_to_chw_index(chw) -> np.ndarray:
    """perm such that vector_chw = vector_hwc[perm]."""
    c, h, w = chw
    return np.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


def flatten_permutation(model: CompiledModel) -> Optional[np.ndarray]:
    """For channels-last frameworks: the index array that puts the model's output in canonical order, or None.

    Needed only when a flattened feature map reaches the output with no dense layer after the flatten (e.g.
    conv → flatten → softmax); a dense or batchnorm in between has its weights permuted instead. Apply it as
    ``output[:, perm]``.
    """
    flattened = None
    for layer in model.layers:
        if layer.type == "flatten" and len(layer.in_shape) == 3:
            flattened = layer.in_shape
        elif layer.type == "dense":
            flattened = None
    return None if flattened is None else _hwc_to_chw_index(flattened)


# The kernels held like a conv kernel (OIHW ↔ HWIO) and like a depthwise one, per layer type.
CONV_KERNELS = {"conv2d": "kernel", "separable_conv2d": "pointwise_kernel"}
DEPTHWISE_KERNELS = {"depthwise_conv2d": "kernel", "separable_conv2d": "depthwise_kernel"}


def _depthwise(kernel: np.ndarray, channels: int, to_native: bool) -> np.ndarray:
    """(C·m, 1, kh, kw) ↔ (kh, kw, C, m): canonical output channel c·m + j is native [..., c, j]."""
    if to_native:
        _, _, kh, kw = kernel.shape
        return kernel.reshape(channels, -1, kh, kw).transpose(2, 3, 0, 1)
    kh, kw, c, m = kernel.shape
    return kernel.transpose(2, 3, 0, 1).reshape(c * m, 1, kh, kw)


def to_canonical(model: CompiledModel, native: Dict[str, np.ndarray], layout: str) -> Dict[str, np.ndarray]:
    """Framework tensors keyed by canonical name → canonical layout (float32, C-contiguous)."""
    return _convert(model, native, layout, to_native=False)


def from_canonical(model: CompiledModel, canonical: Dict[str, np.ndarray], layout: str) -> Dict[str, np.ndarray]:
    """Canonical tensors → the framework's layout, keyed by the same canonical names."""
    return _convert(model, canonical, layout, to_native=True)


def _convert(model: CompiledModel, tensors, layout: str, to_native: bool) -> Dict[str, np.ndarray]:
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    if layout == CHANNELS_FIRST:
        return out
    for layer in model.walk():
        # Only the tensors present are converted: optimizer slots, for example, exist for trainable ones only.
        names = [n for n in (f"{layer.name}/{w}" for w in (*layer.weights, *layer.states)) if n in out]
        key = f"{layer.name}/kernel"
        conv_key = f"{layer.name}/{CONV_KERNELS[layer.type]}" if layer.type in CONV_KERNELS else None
        depthwise_key = f"{layer.name}/{DEPTHWISE_KERNELS[layer.type]}" if layer.type in DEPTHWISE_KERNELS else None
        if conv_key in out:
            # OIHW → HWIO is transpose(2, 3, 1, 0); its inverse is transpose(3, 2, 0, 1).
            out[conv_key] = out[conv_key].transpose((2, 3, 1, 0) if to_native else (3, 2, 0, 1))
        if depthwise_key in out:
            out[depthwise_key] = _depthwise(out[depthwise_key], layer.in_shape[0], to_native)
        if layer.type == "dense" and key in out:
            kernel = out[key]
            if not to_native:
                kernel = kernel.T  # (in, out) → (out, in)
            if layer.flattened_from is not None:
                perm = _hwc_to_chw_index(layer.flattened_from)
                kernel = kernel[:, np.argsort(perm)] if to_native else kernel[:, perm]
            out[key] = kernel.T if to_native else kernel
        elif layer.type == "batchnorm" and layer.flattened_from is not None:
            perm = _hwc_to_chw_index(layer.flattened_from)
            for key in names:
                out[key] = out[key][np.argsort(perm)] if to_native else out[key][perm]
        for key in names:
            out[key] = np.ascontiguousarray(out[key])
    return out
