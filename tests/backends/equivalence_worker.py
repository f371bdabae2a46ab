"""Run equivalence cases in ONE framework and write what it computed, for tests/backends/test_equivalence.py.

    python tests/backends/equivalence_worker.py JOB.json OUT.npz

Each framework runs in its own process: Keras picks its backend once per process, and TensorFlow and PyTorch
loaded together can disagree about threads and allocators. The job names the framework (as in ``framework=``),
its options, and cases; each case is a spec, an input shape, a data .npz (canonical weights under
``weights/<name>``, ``images``, ``batch_images``/``batch_labels`` of shape (steps, batch, ...)) and commands:

- ``info``: native parameter counts and per-layer output shapes (top-level layers; Keras: every Keras layer);
- ``forward``: set the weights, ``predict_logits(images)``;
- ``roundtrip``: set the weights, ``get_weights()``;
- ``train``: a fresh runner with the command's optimizer (and optional ``spec``), set the weights, one
  ``train_step`` + ``train_metrics`` per batch → per-step losses, then the final canonical weights;
- ``resume``: the same steps in one runner, and split across two runners joined by get/set_training_state;
- ``rates``: a fresh runner, every step's rate of the command's ``schedule`` set and read back from the framework
  (``val_losses``, one per epoch, drive ``plateau``);
- ``fit``: a fresh runner trained for ``epochs`` over the data's ``fit_images``/``fit_labels`` in batches of
  ``batch``, in order → each epoch's mean loss, then the accuracy on ``fit_test_images``/``fit_test_labels``.

``forward``, ``train`` and ``fit`` take a ``precision`` (``trainer.precision``; fp32 when absent).

``train`` and ``resume`` also take a ``schedule`` (the rate set before every step, as the trainer does, the steps
being one epoch) and a ``label_smoothing``; ``optimizer`` takes every key of cnnrun's optimizer group. ``train``
with ``mix_lams`` (one λ per step) trains mixed batches against the data's ``batch_partner_labels``.

Output keys: ``<case>/<command id>/<what>``, plus ``modules/<package>`` = 1 for each framework package the
process ended up importing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Dict

import numpy as np

from cnnrun.backends import BACKENDS, create_runner, validate_options
from cnnrun.config import DeviceConfig, OptimizerConfig
from cnnrun.data.augment import Mix
from cnnrun.schedules import LearningRate, validate_schedule
from cnnrun.spec import CompiledModel, compile_model

FRAMEWORK_PACKAGES = tuple(info.package for info in BACKENDS.values())


def _channels_first_shapes(model: CompiledModel, blocks, x) -> Dict[str, list]:
    """Each top-level layer's output shape, from pushing ``x`` (N, C, H, W) through the framework's own blocks
    one by one, reported like Keras's: [H, W, C] for maps, [units] for vectors."""
    shapes = {}
    for layer, block in zip(model.layers, blocks):
        x = block(x)
        shape = [int(d) for d in x.shape[1:]]
        shapes[layer.name] = shape[1:] + shape[:1] if len(shape) == 3 else shape
    return shapes


def _torch_counts(runner, model: CompiledModel) -> Dict[str, Any]:
    import torch

    runner.net.eval()
    with torch.no_grad():
        shapes = _channels_first_shapes(model, runner.net.layers, torch.zeros(2, *model.input_shape))
    return {"trainable": sum(p.numel() for p in runner.net.parameters() if p.requires_grad), "layer_shapes": shapes,
            "shapes_of": "top_level"}


def _chainer_counts(runner, model: CompiledModel) -> Dict[str, Any]:
    import chainer

    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        shapes = _channels_first_shapes(model, runner.net, np.zeros((2, *model.input_shape), np.float32))
    return {"trainable": sum(int(p.size) for p in runner.net.params()), "layer_shapes": shapes,
            "shapes_of": "top_level"}


def _tensorflow_counts(runner, model: CompiledModel) -> Dict[str, Any]:
    return {"trainable": sum(int(np.prod(v.shape)) for v in runner.trainable_variables)}


def _keras_counts(runner, model: CompiledModel) -> Dict[str, Any]:
    model = runner.keras_model
    # Keras layers are named after canonical layers ('/' → '__'); helpers carry a suffix (__pad, __add).
    shapes = {layer.name.replace("__", "/"): [int(d) for d in layer.output.shape[1:]] for layer in model.layers}
    return {
        "trainable": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        "count_params": int(model.count_params()),
        "layer_shapes": shapes,
    }


# How each framework counts its own parameters (test_equivalence fails for a framework without an entry).
NATIVE_COUNTS: Dict[str, Callable[[Any, CompiledModel], Dict[str, Any]]] = {
    "torch": _torch_counts,
    "tensorflow": _tensorflow_counts,
    "keras": _keras_counts,
    "chainer": _chainer_counts,
}


def _losses(runner, batches, set_rate=lambda runner, step: None, first_step: int = 0, mixes=None) -> list:
    """One train_step per (images, labels) batch, the schedule's rate set before it (and the step's Mix given,
    when ``mixes`` holds one per step); the loss of each step, in float64."""
    losses = []
    for step, (images, labels) in enumerate(batches, first_step):
        set_rate(runner, step)
        runner.train_step(images, labels, None if mixes is None else mixes[step])
        losses.append(float(runner.train_metrics()[0]))
    return losses


class Worker:
    def __init__(self, job: Dict[str, Any]):
        self.framework = job["framework"]
        self.options = validate_options(self.framework, job.get("options", {}))
        self.out: Dict[str, np.ndarray] = {}

    def runner(self, model: CompiledModel, case: Dict[str, Any], optimizer: Dict[str, Any],
               label_smoothing: float = 0.0, precision: str = "fp32"):
        return create_runner(
            self.framework, model, OptimizerConfig(**optimizer), self.options, DeviceConfig(name="cpu"),
            0, tuple(case["mean"]), tuple(case["std"]), label_smoothing=label_smoothing, precision=precision,
        )

    @staticmethod
    def rate_setter(command, steps: int) -> Callable[[Any, int], None]:
        """What the trainer does before step i of a one-epoch run with the command's schedule (or nothing)."""
        if "schedule" not in command:
            return lambda runner, i: None
        rate = LearningRate(validate_schedule(command["schedule"]), command["optimizer"]["lr"], epochs=1)
        return lambda runner, i: runner.set_learning_rate(rate.at(0, i, steps, None))

    def run_case(self, case: Dict[str, Any]) -> None:
        data = dict(np.load(case["data"]))
        weights = {k[len("weights/"):]: v for k, v in data.items() if k.startswith("weights/")}
        model = compile_model(case["spec"], tuple(case["input_shape"]), case["num_classes"])
        default_opt = {"name": "sgd", "lr": 0.01}
        shared: Dict[str, Any] = {}  # one runner per precision serves info, forward and roundtrip
        for command in case["commands"]:
            kind, key = command["kind"], f"{case['name']}/{command.get('id', command['kind'])}"
            if kind == "train":
                self.train(key, case, command, weights, data)
                continue
            if kind == "resume":
                self.resume(key, case, command, weights, data)
                continue
            if kind == "rates":
                self.rates(key, model, case, command)
                continue
            if kind == "fit":
                self.fit(key, model, case, command, weights, data)
                continue
            precision = command.get("precision", "fp32")
            if precision not in shared:
                shared[precision] = self.runner(model, case, default_opt, precision=precision)
            runner = shared[precision]
            if kind == "info":
                self.info(key, runner, model)
            elif kind == "forward":
                runner.set_weights(weights)
                self.out[f"{key}/logits"] = runner.predict_logits(data["images"])
            elif kind == "roundtrip":
                runner.set_weights(weights)
                for name, value in runner.get_weights().items():
                    self.out[f"{key}/{name}"] = value
            else:
                raise ValueError(f"unknown command {kind!r}")

    def info(self, key: str, runner, model: CompiledModel) -> None:
        counter = NATIVE_COUNTS.get(self.framework)
        counts = counter(runner, model) if counter else {}
        self.out[f"{key}/json"] = np.frombuffer(json.dumps(counts).encode(), np.uint8)

    def train(self, key: str, case, command, weights, data) -> None:
        spec = command.get("spec", case["spec"])
        model = compile_model(spec, tuple(case["input_shape"]), case["num_classes"])
        runner = self.runner(model, case, command["optimizer"], command.get("label_smoothing", 0.0),
                             command.get("precision", "fp32"))
        runner.set_weights(weights)
        set_rate = self.rate_setter(command, len(data["batch_images"]))
        mixes = None
        if "mix_lams" in command:
            mixes = [Mix(partners, lam) for partners, lam in zip(data["batch_partner_labels"], command["mix_lams"])]
        batches = zip(data["batch_images"], data["batch_labels"])
        self.out[f"{key}/losses"] = np.asarray(_losses(runner, batches, set_rate, mixes=mixes))
        for name, value in runner.get_weights().items():
            self.out[f"{key}/weights/{name}"] = value
        state = runner.get_training_state()
        runner.set_training_state(state)  # must accept its own state
        for name, value in state.items():
            self.out[f"{key}/state/{name}"] = np.asarray(value)

    def resume(self, key: str, case, command, weights, data) -> None:
        """Losses of all steps in one runner, and of the same steps split across two runners by a resume."""
        model = compile_model(command.get("spec", case["spec"]), tuple(case["input_shape"]), case["num_classes"])
        batches = list(zip(data["batch_images"], data["batch_labels"]))
        half = len(batches) // 2
        set_rate = self.rate_setter(command, len(batches))

        straight = self.runner(model, case, command["optimizer"])
        straight.set_weights(weights)
        self.out[f"{key}/straight"] = np.asarray(_losses(straight, batches, set_rate))
        first = self.runner(model, case, command["optimizer"])
        first.set_weights(weights)
        losses = _losses(first, batches[:half], set_rate)
        saved_weights, saved_state = first.get_weights(), first.get_training_state()
        second = self.runner(model, case, command["optimizer"])
        second.set_weights(saved_weights)
        second.set_training_state(saved_state)
        self.out[f"{key}/resumed"] = np.asarray(losses + _losses(second, batches[half:], set_rate, first_step=half))

    def fit(self, key: str, model, case, command, weights, data) -> None:
        """Train from the case's weights for whole epochs; each epoch's mean loss and the test accuracy."""
        runner = self.runner(model, case, command["optimizer"], precision=command.get("precision", "fp32"))
        runner.set_weights(weights)
        images, labels, batch = data["fit_images"], data["fit_labels"], command["batch"]
        epoch_losses = []
        for _ in range(command["epochs"]):
            for start in range(0, len(labels), batch):
                runner.train_step(images[start:start + batch], labels[start:start + batch])
            epoch_losses.append(runner.train_metrics()[0])
        predictions = runner.predict_logits(data["fit_test_images"]).argmax(axis=1)
        self.out[f"{key}/losses"] = np.asarray(epoch_losses)
        self.out[f"{key}/test_acc"] = np.asarray((predictions == data["fit_test_labels"]).mean())
        for name, value in runner.get_weights().items():
            self.out[f"{key}/weights/{name}"] = value

    def rates(self, key: str, model, case, command) -> None:
        """Every step's rate of a whole run (``epochs`` × ``steps_per_epoch``), as the framework holds it."""
        runner = self.runner(model, case, command["optimizer"])
        rate = LearningRate(validate_schedule(command["schedule"]), command["optimizer"]["lr"], command["epochs"])
        steps, held, state = command["steps_per_epoch"], [], rate.initial_state()
        for epoch in range(command["epochs"]):
            for step in range(steps):
                runner.set_learning_rate(rate.at(epoch, step, steps, state))
                held.append(runner.learning_rate())
            state = rate.end_epoch(state, command.get("val_losses", [0.0] * command["epochs"])[epoch])
        self.out[f"{key}/rates"] = np.asarray(held, np.float64)


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as fh:
        job = json.load(fh)
    worker = Worker(job)
    for case in job["cases"]:
        worker.run_case(case)
    for package in FRAMEWORK_PACKAGES:
        worker.out[f"modules/{package}"] = np.asarray(int(package in sys.modules))
    np.savez(out_path, **worker.out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
