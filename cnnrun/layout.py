"""Conversions between cnnrun's canonical weight layout and each framework's, in one place.

Canonical (what checkpoints hold, and what PyTorch and Chainer use natively):
- conv kernel OIHW; dense kernel (out, in); biases and batchnorm vectors (C,);
- a vector made by ``flatten`` is in C·H·W order, so the dense (or batchnorm) after it indexes features that way.

Channels-last frameworks (TensorFlow, Keras) hold conv kernels HWIO (a grouped conv's (kh, kw, in/groups, out)),
depthwise kernels (kh, kw, C, m) where canonical is (C·m, 1, kh, kw) (HWIO reshaped: the same order of values),
dense kernels (in, out), and flatten an H×W×C map in H·W·C order; for a layer fed by a flatten, the feature axis is permuted between the two orders.

Nothing here knows a layer type: each tensor's canonical axes come from its spec (``TENSORS`` in
:mod:`cnnrun.spec.layers`; letters O, I, H, W). Channels-last holds the same axes in H, W, I, O order, and a
layer fed by a flatten (``flattened_from``) has its ``I`` axis permuted.
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
        elif not layer.spec.keeps_feature_order:
            flattened = None
    return None if flattened is None else _hwc_to_chw_index(flattened)


def to_canonical(model: CompiledModel, native: Dict[str, np.ndarray], layout: str) -> Dict[str, np.ndarray]:
    """Framework tensors keyed by canonical name → canonical layout (float32, C-contiguous)."""
    return _convert(model, native, layout, to_native=False)


def from_canonical(model: CompiledModel, canonical: Dict[str, np.ndarray], layout: str) -> Dict[str, np.ndarray]:
    """Canonical tensors → the framework's layout, keyed by the same canonical names."""
    return _convert(model, canonical, layout, to_native=True)


def channels_last_axes(axes: str) -> str:
    """A tensor's axes as channels-last frameworks hold them: OIHW → HWIO, OI → IO, a vector stays itself."""
    return "".join(a for a in "HWIO" if a in axes)


def _convert(model: CompiledModel, tensors, layout: str, to_native: bool) -> Dict[str, np.ndarray]:
    """Native arrays come back in the shape the spec declares (a framework may hold a tensor reshaped, e.g. a
    depthwise kernel as (H, W, C, M)); native ones go out in the declared axes' order, and a backend reshapes them
    to its variable's shape when it writes them (the order of values is the same)."""
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    for layer in model.walk():
        perm = None if layer.flattened_from is None else _hwc_to_chw_index(layer.flattened_from)
        shapes = {**layer.weights, **layer.states}
        for param, tensor in layer.tensors.items():
            key = f"{layer.name}/{param}"
            if key not in out:  # only the tensors present: optimizer slots, for example, exist for trainable ones
                continue
            canonical, shape, value = tensor.axes, tuple(shapes[param]), out[key]
            if layout == CHANNELS_FIRST:
                out[key] = value if to_native or value.shape == shape else value.reshape(shape)
                continue
            native = channels_last_axes(canonical)
            if to_native:
                if perm is not None and "I" in canonical:
                    value = np.take(value, np.argsort(perm), axis=canonical.index("I"))
                value = value.transpose([canonical.index(a) for a in native])
            else:
                value = value.reshape([shape[canonical.index(a)] for a in native])
                value = value.transpose([native.index(a) for a in canonical])
                if perm is not None and "I" in canonical:
                    value = np.take(value, perm, axis=canonical.index("I"))
            out[key] = np.ascontiguousarray(value)
    return out
