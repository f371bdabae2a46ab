"""Padding and output-size arithmetic, with TensorFlow's definitions, shared by every backend.

All sizes are per spatial axis. ``padding`` is already resolved: ``'valid'``, ``'same'`` or a non-negative int.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

Padding = Union[str, int]


def output_size(n: int, kernel: int, stride: int, padding: Padding) -> int:
    """Output length of a sliding window (convolution or pooling) over ``n`` cells.

    ``valid``: floor((n - k) / s) + 1; ``same``: ceil(n / s); int p: floor((n + 2p - k) / s) + 1.
    The result may be <= 0: the caller turns that into an error naming the layer.
    """
    if padding == "same":
        return math.ceil(n / stride)
    pad = 0 if padding == "valid" else int(padding)
    if n + 2 * pad < kernel:
        return 0
    return (n + 2 * pad - kernel) // stride + 1


def pad_amounts(n: int, kernel: int, stride: int, padding: Padding) -> Tuple[int, int]:
    """Zero cells added (before, after) one axis so that a plain 'valid' window gives ``output_size``.

    For ``same`` the total is max((out - 1)·s + k - n, 0) with the smaller half before (top/left), as in
    TensorFlow; PyTorch and Chainer pad symmetrically, so their backends pad explicitly with these numbers.
    """
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        out = math.ceil(n / stride)
        total = max((out - 1) * stride + kernel - n, 0)
        return (total // 2, total - total // 2)
    return (int(padding), int(padding))


def empty_window(n: int, kernel: int, stride: int, padding: Padding) -> str | None:
    """Which window ('first' or 'last') covers padding only, or None when every window holds a real cell.

    Windows cover [i·s − before, i·s − before + k − 1] of the ``n`` real cells [0, n − 1]. One in the middle can
    only be empty if the first (all left of 0) or the last (all right of n − 1) is, even with a stride larger
    than the window, so these two decide. A pooling has no value for such a window (max of -inf, mean of
    nothing). 'same' padding never makes one: it pads less than a window before, and its last window starts
    at (out − 1)·s − before < n.
    """
    before, _ = pad_amounts(n, kernel, stride, padding)
    out = output_size(n, kernel, stride, padding)
    if out <= 0:
        return None  # no windows at all: the empty output is reported on its own
    if kernel - 1 - before < 0:
        return "first"
    if (out - 1) * stride - before > n - 1:
        return "last"
    return None


def real_cell_scale(in_hw, size, strides, pads):
    """(OH, OW) float32 NumPy array: window area / the number of real (unpadded) cells under each output's window.

    Multiplying an average over zero-padded windows by it gives the average over real cells only (cnnrun's
    average pooling). One definition for every backend; ``pads`` is ((top, bottom), (left, right)).
    """
    import numpy as np  # here, not at import: task=summary imports no NumPy

    counts = []
    for n, k, s, (before, after) in zip(in_hw, size, strides, pads):
        starts = np.arange((n + before + after - k) // s + 1) * s - before
        counts.append(np.minimum(starts + k, n) - np.maximum(starts, 0))
    return ((size[0] * size[1]) / np.outer(counts[0], counts[1])).astype(np.float32)
