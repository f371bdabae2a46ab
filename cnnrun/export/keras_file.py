"""Keras 3 export: a ``.keras`` file of the Keras model behind a uint8-NHWC front; reload it where cnnrun is
installed (a few of its layers are cnnrun's own, see :func:`cnnrun.backends.keras.custom_layers`):

    from cnnrun.export.keras_file import custom_objects
    model = keras.saving.load_model("model.keras", custom_objects=custom_objects())
    logits = model(images)   # uint8 (N, H, W, C) → float32 logits (N, classes)
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict

import numpy as np

from cnnrun.predictor import checkpoint_runner


@functools.lru_cache(maxsize=None)
def _uint_images_layer():
    import keras

    @keras.saving.register_keras_serializable(package="cnnrun")
    class UintImages(keras.layers.Layer):
        """uint8 (N, H, W, C) → float32 ``(x - mean) · (1 / std)``, as the Keras runners normalise."""

        def __init__(self, mean, std, **kwargs):
            super().__init__(**kwargs)
            self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
            self._mean = np.asarray(self.mean, np.float32)
            self._inv_std = np.float32(1.0) / np.asarray(self.std, np.float32)

        def get_config(self):
            return {**super().get_config(), "mean": self.mean, "std": self.std}

        def call(self, images):
            x = keras.ops.cast(images, "float32")
            return (x - keras.ops.convert_to_tensor(self._mean)) * keras.ops.convert_to_tensor(self._inv_std)

        def compute_output_shape(self, shape):
            return shape

    return UintImages


def custom_objects() -> Dict[str, object]:
    """The cnnrun layers and activations a ``.keras`` file from cnnrun may use, for ``keras.saving.load_model``."""
    from cnnrun.backends.keras import custom_layers

    layers = dict(vars(custom_layers()))
    layers["UintImages"] = _uint_images_layer()
    return layers


def write(ckpt, model, path: Path, options) -> None:
    runner = checkpoint_runner(ckpt, model, "keras", options)
    import keras  # imported by the runner, on the backend framework.backend chose

    c, h, w = model.input_shape
    images = keras.Input((h, w, c), dtype="uint8", name="images")
    normalised = _uint_images_layer()(ckpt.mean, ckpt.std, name="normalise")(images)
    wrapped = keras.Model(images, runner.keras_model(normalised), name=model.name)
    wrapped.save(str(path))
