"""Train the equivalence cases with the shared trainer, as one process or as one rank of several; rank 0 writes
what each case computed. For tests/distributed/test_parallel_equivalence.py.

    python tests/distributed/trainer_worker.py OUT.npz [ENGINE]                         # one process
    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/distributed/trainer_worker.py OUT.npz
    mpiexec -n 2 python tests/distributed/trainer_worker.py OUT.npz chainer

The path is the production one below the CLI: the engine (ENGINE: torch, the default, tensorflow or chainer) joins
the world (gloo; TF_CONFIG workers; MPI), wraps the runner (gradients averaged, and synchronised batchnorm where the
case asks), and :class:`cnnrun.distributed.runner.ShardedRunner` takes each rank's rows of every global batch.
Output keys: ``<case>/train_loss``, ``<case>/val_loss`` (per epoch) and ``<case>/weights/<tensor>``; and
``world/threads_left``, the collective's threads still running after the world was left.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cnnrun.backends import create_runner, validate_options
from cnnrun.config import DeviceConfig, OptimizerConfig, TrainerConfig
from cnnrun.data import Dataset
from cnnrun.distributed import load_engine
from cnnrun.distributed.collective import LOCAL
from cnnrun.distributed.runner import ShardedRunner
from cnnrun.distributed.world import detect_world
from cnnrun.progress import SilentView
from cnnrun.spec import compile_model
from cnnrun.tracking import NullLogger
from cnnrun.trainer import Trainer
from tests.numpy_runner import quadrants

# 61 training images in global batches of 9: six of 9 and a last one of 7, so no batch divides by two ranks;
# 23 validation images in evaluation batches of 8 (the last one 7).
DATASET = Dataset("quadrants", quadrants(61, 0), quadrants(23, 1), quadrants(20, 2),
                  ("top-left", "top-right", "bottom-left", "bottom-right"), "tests/numpy_runner.py")
TRAINER = TrainerConfig(epochs=2, batch_size=9, eval_batch_size=8, patience=None, log_every=3, progress=False)
OPTIMIZER = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)

PLAIN = {"name": "plain", "layers": [
    {"type": "conv2d", "filters": 4, "kernel": 2, "padding": "same", "activation": "relu"},
    {"type": "flatten"},
    {"type": "dense", "units": 4},
    {"type": "softmax"},
]}
BATCHNORM = {"name": "batchnorm", "layers": [
    {"type": "conv2d", "filters": 4, "kernel": 2, "padding": "same", "bias": False},
    {"type": "batchnorm", "momentum": 0.9},
    {"type": "activation", "fn": "relu"},
    {"type": "flatten"},
    {"type": "dense", "units": 4},
    {"type": "softmax"},
]}
# Engine → its cases: (case, framework, options, spec, sync_batchnorm); Keras cases last (Keras picks its backend
# once per process).
CASES = {
    "torch": [
        ("torch", "torch", {}, PLAIN, False),
        ("torch-syncbn", "torch", {}, BATCHNORM, True),
        ("torch-fp16", "torch", {}, PLAIN, False),
        ("torch-syncbn-bf16", "torch", {}, BATCHNORM, True),
        ("keras-torch", "keras", {"backend": "torch"}, PLAIN, False),
        ("keras-torch-syncbn", "keras", {"backend": "torch"}, BATCHNORM, True),
    ],
    "tensorflow": [
        ("tensorflow", "tensorflow", {}, PLAIN, False),
        ("tensorflow-syncbn", "tensorflow", {}, BATCHNORM, True),
        ("tensorflow-fp16", "tensorflow", {}, PLAIN, False),
        ("keras-tensorflow", "keras", {"backend": "tensorflow"}, PLAIN, False),
        ("keras-tensorflow-syncbn", "keras", {"backend": "tensorflow"}, BATCHNORM, True),
    ],
    "chainer": [("chainer", "chainer", {}, PLAIN, False)],  # no synchronised batchnorm: sync_batchnorm_refusal
}
# Cases trained in another trainer.precision than fp32: fp16's loss scaling must compose with the ranks' loss
# weighting (Chainer's mixed16 needs CUDA).
PRECISION = {"torch-fp16": "fp16", "torch-syncbn-bf16": "bf16", "tensorflow-fp16": "fp16"}


def main(out: str, engine_name: str = "torch") -> None:
    world = detect_world()
    device = DeviceConfig(name="cpu", threads=1)
    engine = load_engine(engine_name)
    collective = engine.join(world, device) if world.started else LOCAL
    results = {}
    for case, framework, options, spec, sync in CASES[engine_name]:
        model = compile_model(spec, DATASET.input_shape, DATASET.num_classes)
        runner = create_runner(framework, model, OPTIMIZER, validate_options(framework, options), device, 0,
                               DATASET.mean, DATASET.std, precision=PRECISION.get(case, "fp32"))
        if world.started:
            runner = ShardedRunner(runner, collective, engine.wrap(runner, collective, sync), model.num_classes)
        trainer = Trainer(runner, DATASET, TRAINER, NullLogger(), SilentView(), lambda kind, state: None,
                          collective=collective)
        state = trainer.fit()
        results[f"{case}/train_loss"] = np.array([row["train_loss"] for row in state.history])
        results[f"{case}/val_loss"] = np.array([row["val_loss"] for row in state.history])
        runner.predict_logits(DATASET.val.images[:1])  # every rank holds rank 0's running statistics from here
        results.update({f"{case}/weights/{k}": v for k, v in runner.get_weights().items()})
    del runner, trainer  # as the train task does: nothing may hold the world when it is left
    collective.close()
    results["world/threads_left"] = np.array(len(collective_threads()))
    if world.is_main:
        np.savez(out, **results)


def collective_threads():
    """This process's threads that a collective started and left running (gloo's workers, by their Linux names)."""
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return [name for name in names if name.startswith(("pt_gloo", "gloo"))]


if __name__ == "__main__":
    main(*sys.argv[1:])
