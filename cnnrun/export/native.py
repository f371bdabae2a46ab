"""What the native formats share: a runner on the CPU holding the checkpoint's weights, built by its framework."""

from __future__ import annotations

from cnnrun.checkpoint import Checkpoint
from cnnrun.spec import CompiledModel

SAMPLE_BATCH = 2  # traced and checked with a batch of this size; every format accepts any batch size


def inference_runner(framework: str, ckpt: Checkpoint, model: CompiledModel, options):
    """A runner of ``framework`` with the checkpoint's weights; its optimizer is never used."""
    from cnnrun.backends import create_runner
    from cnnrun.config import DeviceConfig, OptimizerConfig

    runner = create_runner(framework, model, OptimizerConfig(name="sgd", lr=0.01), options, DeviceConfig(name="cpu"),
                           0, ckpt.mean, ckpt.std)
    runner.set_weights(ckpt.weights)
    return runner
