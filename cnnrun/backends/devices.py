"""Device choice shared by every backend: ``device=cpu|cuda|cuda:N|auto`` against the GPUs a framework sees.

The config parses and checks the name (:class:`cnnrun.config.DeviceConfig`); each backend probes its own
framework for GPUs and passes the count here, so the rules and the messages are the same everywhere.
"""

from __future__ import annotations

from typing import Optional

from cnnrun.errors import UserError


def gpu_index(device, gpus: int, framework: str, why_none: str) -> Optional[int]:
    """The CUDA index to run on, or None for the CPU; a UserError when ``device`` asks for a GPU there is not.

    ``gpus``: how many GPUs ``framework`` sees; ``why_none``: what to say when it sees none (with the framework's
    version and build, and what to do instead).
    """
    if device.kind == "cpu" or (device.kind == "auto" and gpus == 0):
        return None
    if gpus == 0:
        raise UserError(f"device={device.name}: {why_none}")
    index = device.cuda_index
    if index >= gpus:
        raise UserError(f"device=cuda:{index}: only {gpus} GPU(s) visible to {framework}")
    return index
