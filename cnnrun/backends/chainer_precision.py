"""``trainer.precision=fp16`` for Chainer: its mixed16 mode, on CUDA only (see :mod:`cnnrun.precision`).

Built under ``chainer.mixed16``, convolution and dense weights are float16 and batchnorm's are float32; the
optimizer keeps float32 master copies (``use_fp32_update``) that it updates and the checkpoints read, and scales
the loss dynamically (Chainer's ``loss_scaling``: doubled each step until a gradient overflows, then grown
slowly; an overflowed step is skipped). Images enter in float16, the softmax cross-entropy runs on float32
logits. fp32 runs exactly as before: every method here is then a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import numpy as np

from cnnrun.backends.chainer_env import import_chainer
from cnnrun.precision import LOSS_SCALE_GROWTH_INTERVAL

chainer = import_chainer()
import chainer.functions as F  # noqa: E402


class Mixed16:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def build_scope(self):
        """Links created inside get mixed16's parameter dtypes."""
        return chainer.using_config("dtype", chainer.mixed16) if self.enabled else contextlib.nullcontext()

    def setup(self, optimizer) -> None:
        if self.enabled:
            optimizer.use_fp32_update()
            optimizer.loss_scaling(interval=LOSS_SCALE_GROWTH_INTERVAL)

    def inputs(self, x):
        return x.astype(np.float16) if self.enabled else x

    def logits(self, logits):
        """Float32 logits for the softmax cross-entropy."""
        return F.cast(logits, np.float32) if self.enabled else logits

    def backward(self, loss, optimizer) -> None:
        """Gradients of the loss, times the dynamic loss scale under mixed16; ``optimizer.update()`` checks them
        for overflow and unscales them (after the ranks' gradients are averaged, when training on several)."""
        loss.backward(loss_scale=optimizer._loss_scale if self.enabled else None)

    def loss_scale(self, optimizer) -> float:
        """The factor the gradients carry from :meth:`backward` to ``optimizer.update()``."""
        # Chainer keeps the dynamic scale in ``_loss_scale`` and reads it there itself (Optimizer.update(lossfun)).
        return float(optimizer._loss_scale) if self.enabled else 1.0

    @staticmethod
    def master(param):
        """The float32 master copy the optimizer updates for a float16 parameter, or None."""
        rule = getattr(param, "update_rule", None)
        master = getattr(rule, "_fp32_param", None)  # Chainer's name for it (UpdateRule.use_fp32_update)
        return None if master is None or master.array is None else master

    def state(self, optimizer) -> Dict[str, np.ndarray]:
        if not self.enabled:
            return {}
        return {"loss_scale/scale": np.asarray(optimizer._loss_scale, np.float32),
                "loss_scale/overflowed": np.asarray(optimizer._loss_scaling_isnan_ever, np.int64)}

    def set_state(self, optimizer, state: Dict[str, np.ndarray]) -> None:
        if self.enabled and "loss_scale/scale" in state:
            optimizer._loss_scale = float(state["loss_scale/scale"])
            optimizer._loss_scaling_isnan_ever = bool(state["loss_scale/overflowed"])
