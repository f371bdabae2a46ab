"""Keras on Keras's torch backend: the Keras model called eagerly on torch tensors, ``loss.backward()`` filling its
variables' ``torch.nn.Parameter`` gradients, and ``torch.optim`` updating them (the same optimizer as
framework=torch). The device, batches, metrics and learning rate are the torch backend's
(:class:`~cnnrun.backends.torch.OnTorchDevice`); this module is imported only for ``framework.backend=torch``.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from cnnrun.backends.building import assign_reshaped, read_canonical, slots_by_tensor, write_canonical
from cnnrun.backends.keras import LAYOUT, _keras, build_model, dtype_policy, random_state, set_random_state
from cnnrun.backends.torch import MixedPrecision, OnTorchDevice, cross_entropy, make_optimizer, to_device
from cnnrun.errors import UserError
from cnnrun.layout import from_canonical, to_canonical
from cnnrun.spec import CompiledModel


class KerasTorchRunner(OnTorchDevice):
    """The Runner protocol for a Keras model on Keras's torch backend: eager calls, autograd, ``torch.optim``."""

    def __init__(self, model: CompiledModel, optimizer, options, device, seed: int, mean, std,
                 label_smoothing: float = 0.0, precision: str = "fp32"):
        from cnnrun.spec.init import initial_weights

        if options.jit_compile:
            raise UserError(
                "framework.jit_compile=true needs framework.backend=tensorflow (XLA); Keras models on the "
                "torch backend run eagerly here"
            )
        self.model = model
        # IEEE float32 on CUDA, like every other framework (Keras has no TF32 option of its own); cuDNN autotuned,
        # as Keras on TensorFlow is by TensorFlow's default
        self._use_device(device, seed, tf32=False, cudnn_benchmark=True)
        self.keras = _keras()
        self.scope = str(self.device)
        with self.keras.device(self.scope), dtype_policy(precision):
            self.keras_model, self.builder = build_model(model, seed)
        # The dtype policy casts the layers; this scales the fp16 loss (its autocast is not used).
        self.precision = MixedPrecision(precision, self.device)
        self.tensors = self.builder.tensors
        self.trainable_names = self.builder.trainable
        self.set_weights(initial_weights(model, seed))
        self.mean, self.inv_std = self._normalisation(mean, std, (1, 1, 1, len(mean)))
        self.params = [self.tensors[name].value for name in self.trainable_names]
        self.optimizer = make_optimizer(self.params, optimizer, fused=True)
        self.clip_norm = optimizer.clip_norm
        self.label_smoothing = label_smoothing

    def _inputs(self, images):
        x = to_device(images, self.device).float()
        return (x - self.mean) * self.inv_std  # stays NHWC: Keras is channels_last

    def train_step(self, images, labels, mix=None) -> None:
        y = to_device(labels, self.device)
        with self.keras.device(self.scope):
            logits = self.keras_model(self._inputs(images), training=True)
        loss = cross_entropy(logits.float(), y, self.label_smoothing, mix)  # softmax and loss in float32
        self.precision.step(loss, self.optimizer, self.clip_norm)
        self._count_step(loss, logits, y)

    def predict_logits(self, images) -> np.ndarray:
        with torch.no_grad(), self.keras.device(self.scope):
            logits = self.keras_model(self._inputs(images), training=False)
        return logits.float().cpu().numpy()

    def get_weights(self) -> Dict[str, np.ndarray]:
        return read_canonical(self.model, LAYOUT, self.tensors, lambda var: var.value.detach().cpu().numpy())

    def set_weights(self, weights: Dict[str, np.ndarray]) -> None:
        write_canonical(self.model, LAYOUT, self.tensors, weights, assign_reshaped)

    def get_training_state(self) -> Dict[str, np.ndarray]:
        """torch.optim's slots under PyTorch's names, converted to canonical layout (as the torch backend's)."""
        by_slot: Dict[str, Dict[str, np.ndarray]] = {}
        for name, param in zip(self.trainable_names, self.params):
            for slot, value in self.optimizer.state.get(param, {}).items():
                by_slot.setdefault(slot, {})[name] = value.detach().cpu().numpy().astype(np.float32)
        state: Dict[str, np.ndarray] = {**random_state(self.builder), **self.precision.state()}
        for slot, native in by_slot.items():
            if slot == "step":
                state.update({f"{name}/step": value for name, value in native.items()})
            else:
                state.update({f"{n}/{slot}": v for n, v in to_canonical(self.model, native, LAYOUT).items()})
        return state

    def set_training_state(self, state: Dict[str, np.ndarray]) -> None:
        set_random_state(self.builder, state)
        self.precision.set_state(state)
        by_slot: Dict[str, Dict[str, np.ndarray]] = {}
        for name, slots in slots_by_tensor(state, self.trainable_names).items():
            for slot, value in slots.items():
                by_slot.setdefault(slot, {})[name] = value
        native = {
            slot: values if slot == "step" else from_canonical(self.model, values, LAYOUT)
            for slot, values in by_slot.items()
        }
        for name, param in zip(self.trainable_names, self.params):
            slots = {slot: values[name] for slot, values in native.items() if name in values}
            if slots:
                self.optimizer.state[param] = {
                    slot: torch.from_numpy(np.asarray(v, np.float32)).to(self.device) for slot, v in slots.items()
                }
