"""``trainer.precision`` for the TensorFlow backend (and Keras on TensorFlow): float32 master weights.

Variables stay float32: the optimizer updates them and checkpoints read them. With bf16/fp16, convolution and
dense weights are read through :class:`CastOnRead`, so those ops compute in the low precision and the
gradients (through ``tf.cast``) arrive in float32; batchnorm and padded average pooling compute in float32
(statistics need float32's precision; see :data:`FLOAT32_LAYERS`). The runner casts the normalised images to the
compute dtype and the logits back to float32 before the softmax cross-entropy. fp16 adds :class:`LossScale`.
Imported by :mod:`cnnrun.backends.tensorflow` after TensorFlow has loaded.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import tensorflow as tf

from cnnrun.precision import INITIAL_LOSS_SCALE, LOSS_SCALE_GROWTH_INTERVAL

COMPUTE_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}

# The tensors ops multiply with in the compute dtype (conv2d, dense, depthwise and separable convs); batchnorm's
# gamma, beta and running statistics stay float32.
CAST_ON_READ = ("kernel", "bias", "depthwise_kernel", "pointwise_kernel")
# Layers computed in float32 whatever the precision: batchnorm (batch statistics and running averages would lose
# their small updates in 8 or 11 mantissa bits), average pooling (its real-cell scale is a float32 constant) and
# upsampling (tf.image.resize's bilinear mode returns float32 whatever it is given).
FLOAT32_LAYERS = ("batchnorm", "avgpool", "upsample")


class CastOnRead:
    """A float32 variable that ops read in ``dtype`` (TensorFlow converts it with the function registered
    below), as Keras's mixed-precision variables do: the variable, its gradient and its update stay float32."""

    def __init__(self, variable: tf.Variable, dtype: tf.DType):
        self.variable = variable
        self.dtype = dtype


def _read_cast(value: CastOnRead, dtype=None, name=None, as_ref=False) -> tf.Tensor:
    return tf.cast(value.variable, value.dtype)


tf.register_tensor_conversion_function(CastOnRead, _read_cast)


def reads_in(variable: tf.Variable, param: str, dtype: tf.DType):
    """What an op should hold for a layer's tensor ``param`` (its name in the spec, e.g. ``kernel``): the
    variable, or a low-precision view of it."""
    if dtype == tf.float32 or param not in CAST_ON_READ:
        return variable
    return CastOnRead(variable, dtype)


def in_float32(op: Callable, layer_type: str, dtype: tf.DType) -> Callable:
    """``op`` computing in float32 when its layer type must (FLOAT32_LAYERS), returning the compute dtype."""
    if dtype == tf.float32 or layer_type not in FLOAT32_LAYERS:
        return op
    return lambda x, training: tf.cast(op(tf.cast(x, tf.float32), training), x.dtype)


class LossScale:
    """Dynamic loss scaling (fp16): the loss times ``scale`` before the gradients, the gradients divided after;
    a step with a non-finite gradient is skipped and halves the scale, LOSS_SCALE_GROWTH_INTERVAL finite steps in
    a row double it (torch.amp.GradScaler's and Keras's LossScaleOptimizer's rule)."""

    def __init__(self):
        self.scale = tf.Variable(INITIAL_LOSS_SCALE, trainable=False, dtype=tf.float32, name="loss_scale")
        self.growth_tracker = tf.Variable(0, trainable=False, dtype=tf.int64, name="loss_scale_growth")

    def unscale(self, grads: List[tf.Tensor]):
        """(gradients / scale, whether all are finite)."""
        inverse = 1.0 / self.scale
        grads = [g * inverse for g in grads]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        return grads, finite

    def update(self, finite: tf.Tensor) -> None:
        grown = self.growth_tracker + 1
        grow = tf.logical_and(finite, grown >= LOSS_SCALE_GROWTH_INTERVAL)
        self.scale.assign(tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale), self.scale * 0.5))
        self.growth_tracker.assign(tf.where(finite, tf.where(grow, tf.zeros_like(grown), grown), tf.zeros_like(grown)))

    def state(self) -> Dict[str, np.ndarray]:
        return {"loss_scale/scale": np.asarray(self.scale.numpy(), np.float32),
                "loss_scale/growth_tracker": np.asarray(self.growth_tracker.numpy(), np.int64)}

    def set_state(self, state: Dict[str, np.ndarray]) -> None:
        if "loss_scale/scale" in state:
            self.scale.assign(float(state["loss_scale/scale"]))
            self.growth_tracker.assign(int(state["loss_scale/growth_tracker"]))
