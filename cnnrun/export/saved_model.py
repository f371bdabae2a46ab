"""TensorFlow SavedModel export: a folder whose ``serving_default`` signature maps uint8 ``images`` (N, H, W, C)
to ``logits`` (N, classes); reload with ``tf.saved_model.load``.

    model = tf.saved_model.load("model.savedmodel")
    logits = model.signatures["serving_default"](images=tf.constant(images))["logits"]

``cnnrun.json`` in the folder's ``assets/`` holds classes, input shape and normalisation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cnnrun.export import model_metadata
from cnnrun.predictor import checkpoint_runner

METADATA_FILE = "cnnrun.json"


def write(ckpt, model, path: Path, options) -> None:
    from cnnrun.backends.tensorflow import tf

    runner = checkpoint_runner(ckpt, model, "tensorflow", options)
    c, h, w = model.input_shape
    module = tf.Module()
    module.variables_to_save = list(runner.net.variables.by_name.values())  # tracked, so they are saved

    @tf.function(input_signature=[tf.TensorSpec((None, h, w, c), tf.uint8, name="images")])
    def serve(images):
        return {"logits": runner.logits(images)}

    module.serve = serve
    # TensorFlow logs each save step (renamed captures, assets written) at INFO: not news to a cnnrun user.
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    assets = Path(path) / "assets"
    assets.mkdir(exist_ok=True)
    (assets / METADATA_FILE).write_text(json.dumps(model_metadata(ckpt, model), indent=1))
