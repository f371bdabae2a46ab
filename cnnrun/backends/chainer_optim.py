"""Adam, AdamW, SGD and RMSprop for Chainer with PyTorch's update formulas, so every framework runs the same update.

Chainer's own optimizers differ in details that change the numbers: ``chainer.optimizers.Adam`` adds ``eps``
to sqrt(v) *before* the bias correction (PyTorch adds it after: eps is effectively eps·sqrt(1 - beta2^t) in
Chainer), ``MomentumSGD`` keeps ``v = m·v - lr·g`` instead of PyTorch's ``buf = m·buf + g; p -= lr·buf``, and
``NesterovAG`` is a different reformulation. These update rules implement PyTorch's formulas:

Adam (L2 weight decay added to the gradient, as ``torch.optim.Adam(weight_decay=...)``)::

    g += wd·p;  m = lerp(m, g, 1 - b1);  v = b2·v + (1 - b2)·g²
    p -= lr / (1 - b1^t) · m / (sqrt(v) / sqrt(1 - b2^t) + eps)

AdamW: ``p *= 1 - lr·wd`` first (decoupled decay), then Adam's update without the L2 term.

SGD::

    g += wd·p;  buf = m·buf + g;  g = g + m·buf if nesterov else buf;  p -= lr·g

RMSprop (not centered; Chainer's own adds eps inside the root)::

    g += wd·p;  s = a·s + (1 - a)·g²;  d = g / (sqrt(s) + eps);  buf = m·buf + d if momentum else d;  p -= lr·buf

They work on NumPy and CuPy arrays alike (the same array code; in-place where possible to spare allocations).
State slots carry PyTorch's names (``exp_avg``, ``exp_avg_sq``, ``square_avg``, ``step``, ``momentum_buffer``).
The learning rate is read from the optimizer at every update, so a schedule can change it between steps.
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np

from cnnrun.backends.chainer_env import import_chainer

chainer = import_chainer()


class _TorchRule(chainer.optimizer.UpdateRule):
    """Shared plumbing: hyperparameters from cnnrun's OptimizerConfig, state export and import."""

    slots: tuple = ()

    def __init__(self, cfg, owner):
        super().__init__()
        self.cfg = cfg
        self.owner = owner  # the optimizer, whose ``lr`` a schedule changes between steps

    def init_state(self, param) -> None:
        xp = param.device.xp
        with chainer.using_device(param.device):
            for slot in self.slots:
                self.state[slot] = xp.zeros_like(param.array)

    def _gradient(self, param):
        """The gradient with L2 weight decay folded in (a new array only when there is decay); AdamW instead
        decays the weights themselves (decoupled), as ``torch.optim.AdamW``, before its update."""
        grad = param.grad
        if self.cfg.weight_decay and self.cfg.name == "adamw":
            param.array *= 1.0 - self.owner.lr * self.cfg.weight_decay
        elif self.cfg.weight_decay:
            grad = grad + self.cfg.weight_decay * param.array
        return grad

    def export_state(self) -> Dict[str, np.ndarray]:
        """Slots as float32 NumPy arrays; empty before the first update."""
        if not self.state:
            return {}
        out = {slot: _to_numpy(self.state[slot]) for slot in self.slots}
        out["step"] = np.asarray(self.t, np.float32)
        return out

    def import_state(self, slots: Dict[str, np.ndarray], param) -> None:
        """Restore what :meth:`export_state` returned, on the parameter's device."""
        self.t = int(slots.get("step", 0))
        if not all(slot in slots for slot in self.slots):
            return
        # UpdateRule creates its state dict lazily at the first update; restoring before that creates it here.
        # np.array copies: the update is in place and must not write into the caller's arrays.
        self._state = {slot: param.device.send(np.array(slots[slot], np.float32)) for slot in self.slots}


class TorchAdamRule(_TorchRule):
    slots = ("exp_avg", "exp_avg_sq")

    def update_core(self, param) -> None:
        grad = param.grad
        if grad is None:
            return
        cfg, t = self.cfg, self.t  # UpdateRule.update has already counted this step
        grad = self._gradient(param)
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        m += (1.0 - cfg.beta1) * (grad - m)  # torch's lerp_
        v *= cfg.beta2
        v += (1.0 - cfg.beta2) * (grad * grad)
        denom = param.device.xp.sqrt(v)
        denom /= math.sqrt(1.0 - cfg.beta2**t)
        denom += cfg.eps
        step = m / denom
        step *= self.owner.lr / (1.0 - cfg.beta1**t)
        param.array -= step


class TorchSGDRule(_TorchRule):
    def __init__(self, cfg, owner):
        super().__init__(cfg, owner)
        self.slots = ("momentum_buffer",) if cfg.momentum else ()

    def update_core(self, param) -> None:
        if param.grad is None:
            return
        cfg = self.cfg
        grad = self._gradient(param)
        if cfg.momentum:
            buf = self.state["momentum_buffer"]
            buf *= cfg.momentum
            buf += grad  # the first step gives buf = g, as torch's clone(g)
            grad = grad + cfg.momentum * buf if cfg.nesterov else buf
        param.array -= self.owner.lr * grad


class TorchRMSpropRule(_TorchRule):
    def __init__(self, cfg, owner):
        super().__init__(cfg, owner)
        self.slots = ("square_avg", "momentum_buffer") if cfg.momentum else ("square_avg",)

    def update_core(self, param) -> None:
        if param.grad is None:
            return
        cfg = self.cfg
        grad = self._gradient(param)
        square_avg = self.state["square_avg"]
        square_avg *= cfg.alpha
        square_avg += (1.0 - cfg.alpha) * (grad * grad)
        direction = grad / (param.device.xp.sqrt(square_avg) + cfg.eps)
        if cfg.momentum:
            buf = self.state["momentum_buffer"]
            buf *= cfg.momentum
            buf += direction
            direction = buf
        param.array -= self.owner.lr * direction


RULES = {"adam": TorchAdamRule, "adamw": TorchAdamRule, "sgd": TorchSGDRule, "rmsprop": TorchRMSpropRule}


class TorchLikeOptimizer(chainer.optimizer.GradientMethod):
    """A GradientMethod whose every parameter follows one of the rules above."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.lr = cfg.lr

    def create_update_rule(self) -> _TorchRule:
        return RULES[self.cfg.name](self.cfg, self)

    def clip_gradients(self, max_norm: float) -> None:
        """PyTorch's ``clip_grad_norm_``: scale every gradient by min(1, max_norm / (global norm + 1e-6))."""
        grads = [param.grad for _, param in self.target.namedparams() if param.grad is not None]
        if not grads:
            return
        xp = chainer.backend.get_array_module(grads[0])
        norm = float(xp.sqrt(sum(xp.sum(g.astype(np.float64) ** 2) for g in grads)))
        scale = min(1.0, max_norm / (norm + 1e-6))
        if scale < 1.0:
            for grad in grads:
                grad *= grad.dtype.type(scale)


def _to_numpy(array) -> np.ndarray:
    return np.array(chainer.backend.CpuDevice().send(array), dtype=np.float32)  # a copy: updates are in place
