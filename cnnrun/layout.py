"""Conversions between cnnrun's canonical weight layout and each framework's, in one place.

Canonical (what checkpoints hold, and what PyTorch and Chainer use natively):
- conv kernel OIHW; dense kernel (out, in); biases and batchnorm vectors (C,);
- a vector made by ``flatten`` is in C·H·W order, so the dense (or batchnorm) after it indexes features that way.

Channels-last frameworks (TensorFlow, Keras) hold conv kernels HWIO, dense kernels (in, out), and flatten an
H×W×C map in H·W·C order; for a layer fed by a flatten, the feature axis is permuted between the two orders.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from cnnrun.spec import CompiledModel

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"


def _hwc_to_chw_index(chw) -> np.ndarray:
    """perm such that vector_chw = vector_hwc[perm]."""
    c, h, w = chw
    return np.arange(c * h * w).reshape(h, w, c).transpose(2, 0, 1).reshape(-1)


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
        names = [f"{layer.name}/{w}" for w in (*layer.weights, *layer.states)]
        if layer.type == "conv2d":
            key = f"{layer.name}/kernel"
            # OIHW → HWIO is transpose(2, 3, 1, 0); its inverse is transpose(3, 2, 0, 1).
            out[key] = out[key].transpose((2, 3, 1, 0) if to_native else (3, 2, 0, 1))
        elif layer.type == "dense":
            key = f"{layer.name}/kernel"
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
