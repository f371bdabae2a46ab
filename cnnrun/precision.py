"""``trainer.precision``: which number formats each framework computes in, on which device, and the loss-scaling
rule they share. Nothing here imports a framework (the pre-flight checks read it).

- ``fp32``: everything in float32 (the default, and what every equivalence test compares).
- ``bf16``: convolutions and matmuls in bfloat16, weights, optimizer state, batchnorm statistics and the softmax
  cross-entropy in float32. bfloat16 keeps float32's exponent range, so no loss scaling is needed.
- ``fp16``: the same with float16, whose range is narrow: small gradients would flush to zero, so the loss is
  scaled up before the backward pass and the gradients down before the update (dynamic loss scaling below).

Checkpoints are float32 whatever the precision, so a model trained in bf16 loads in any framework at fp32.
"""

from __future__ import annotations

from typing import Optional

from cnnrun.errors import one_of

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT = "fp32"

# Dynamic loss scaling for fp16, the rule of torch.amp.GradScaler and Keras's LossScaleOptimizer: start at 2^15,
# halve the scale and skip the update when a gradient is not finite, double it after this many finite steps.
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH_INTERVAL = 2000


def precision_problem(framework: str, device_kind: str, precision: str) -> Optional[str]:
    """Why ``framework`` cannot train in ``precision`` on ``device_kind`` ('cpu', 'cuda' or 'auto'), or None.

    'auto' (the device is only known once the framework is loaded) is a problem only when no device would do.
    """
    from cnnrun.backends import BACKENDS  # where each framework lists its precisions per device kind

    info = BACKENDS.get(framework)
    if info is None or precision not in PRECISIONS:
        return None  # an unknown framework or precision: their own checks say so
    by_device = info.precisions
    devices = tuple(by_device) if device_kind == "auto" else (device_kind,)
    if any(precision in by_device.get(kind, ()) for kind in devices):
        return None
    if device_kind == "auto":
        message = f"framework={framework} has no {precision} on any device"
    else:
        message = (f"framework={framework} on device={device_kind} trains in "
                   f"{one_of(by_device.get(device_kind, ()))} only, not {precision}")
    elsewhere = [kind for kind, ps in by_device.items() if kind != device_kind and precision in ps]
    if elsewhere:
        message += f" ({framework} runs {precision} on device={' or '.join(elsewhere)})"
    others = [name for name, other in BACKENDS.items()
              if name != framework and any(precision in ps for ps in other.precisions.values())]
    return f"{message}; {precision} runs with framework={one_of(others)}, or set trainer.precision=fp32"


__all__ = ["DEFAULT", "INITIAL_LOSS_SCALE", "LOSS_SCALE_GROWTH_INTERVAL", "PRECISIONS", "precision_problem"]
