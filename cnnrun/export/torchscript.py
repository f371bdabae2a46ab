"""TorchScript export: the PyTorch model behind a uint8-NHWC front, traced; reload with ``torch.jit.load``.

    module = torch.jit.load("model.pt")
    logits = module(torch.from_numpy(images))   # uint8 (N, H, W, C) → float32 logits (N, classes)

The file also holds ``cnnrun.json`` (classes, input shape, normalisation) as a TorchScript extra file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cnnrun.export import model_metadata
from cnnrun.predictor import checkpoint_runner

METADATA_FILE = "cnnrun.json"
SAMPLE_BATCH = 2  # traced with a batch of this size; the traced module takes any batch size


class UintImages(nn.Module):
    """uint8 (N, H, W, C) → the network's logits, normalised exactly as the torch runner does."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("inv_std", (1.0 / torch.tensor(std, dtype=torch.float32)).reshape(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return self.net((x - self.mean) * self.inv_std)


def write(ckpt, model, path: Path, options) -> None:
    runner = checkpoint_runner(ckpt, model, "torch", options)
    module = UintImages(runner.net.to(memory_format=torch.contiguous_format), ckpt.mean, ckpt.std).eval()
    c, h, w = model.input_shape
    sample = torch.randint(0, 256, (SAMPLE_BATCH, h, w, c), dtype=torch.uint8)
    with torch.no_grad():
        traced = torch.jit.trace(module, sample)
    extra = {METADATA_FILE: json.dumps(model_metadata(ckpt, model))}
    torch.jit.save(traced, str(path), _extra_files=extra)
