"""Reload an exported model in its own framework and write its logits, for tests/export/test_native_export.py.

    python tests/export/reload_worker.py FORMAT PATH IMAGES.npy OUT.npy

Each format is loaded the way the README tells a user to, in a process that has imported nothing else.
"""

from __future__ import annotations

import sys

import numpy as np


def torchscript(path: str, images: np.ndarray) -> np.ndarray:
    import torch

    module = torch.jit.load(path)
    with torch.no_grad():
        return module(torch.from_numpy(images)).numpy()


def saved_model(path: str, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    return serve(images=tf.constant(images))["logits"].numpy()


def keras(path: str, images: np.ndarray) -> np.ndarray:
    import keras

    from cnnrun.export.keras_file import custom_objects

    model = keras.saving.load_model(path, custom_objects=custom_objects())
    return np.asarray(model(images))


RELOADERS = {"torchscript": torchscript, "saved_model": saved_model, "keras": keras}

if __name__ == "__main__":
    fmt, path, images_path, out_path = sys.argv[1:5]
    np.save(out_path, RELOADERS[fmt](path, np.load(images_path)).astype(np.float32))
