"""``trainer.resume=PATH|last``: find the checkpoint, and refuse one that does not fit this run, saying why."""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from cnnrun import checkpoint as ckpt_io
from cnnrun.errors import ConfigError, UserError
from cnnrun.spec import compile_model

LAST = "last"
SEARCHED = ("outputs", "multirun")  # Hydra's run and sweep roots, relative to the working directory


def find_last(root: Path) -> Path:
    """The newest checkpoints/last.safetensors under the working directory's Hydra output folders."""
    found: List[Path] = []
    for folder in SEARCHED:
        found += (root / folder).glob("**/checkpoints/last.safetensors")
    if not found:
        places = ", ".join(str(root / f) for f in SEARCHED)
        raise UserError(f"trainer.resume=last: no checkpoints/last.safetensors under {places}; "
                        "give the path instead: trainer.resume=PATH")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_for_resume(ctx) -> Tuple[Path, ckpt_io.Checkpoint]:
    """Load the checkpoint ``trainer.resume`` names and check it can continue this run."""
    wanted = ctx.cfg.trainer.resume
    path = find_last(Path.cwd()) if wanted == LAST else Path(wanted)
    ckpt = ckpt_io.load_setting("trainer.resume", wanted, path)
    try:  # the stored spec is untrusted input: validate it exactly like a user's
        compile_model(ckpt.spec, tuple(ckpt.input_shape), len(ckpt.class_names), f"checkpoint {path}")
    except ConfigError as err:
        raise UserError(f"trainer.resume={wanted}: {err}") from None
    differences = spec_differences(ckpt.spec, ctx.compiled.spec)
    if differences:
        raise UserError(
            f"trainer.resume={wanted}: {path} was trained with a different model:\n  " + "\n  ".join(differences)
        )
    ckpt_io.check_matches(ckpt, ctx.compiled.weight_shapes(), path)
    if not ckpt.training_state or "epoch" not in ckpt.progress:
        raise UserError(f"trainer.resume={wanted}: {path} holds weights only (a final or best model); "
                        "resume from the run's checkpoints/last.safetensors")
    origin = ckpt.origin.get("framework")
    if origin != ctx.cfg.framework.name:
        raise UserError(f"trainer.resume={wanted}: {path} was written by framework={origin}; optimizer state does "
                        f"not carry across frameworks, so resume with framework={origin} (task=eval reads any)")
    return path, ckpt


def spec_differences(stored: dict, current: dict) -> List[str]:
    """Human-readable differences between two resolved specs, layer by layer."""
    lines: List[str] = []
    old, new = stored.get("layers", []), current.get("layers", [])
    for i in range(max(len(old), len(new))):
        a = old[i] if i < len(old) else None
        b = new[i] if i < len(new) else None
        if a != b:
            lines.append(f"model.layers[{i}]: checkpoint {_brief(a)}, this run {_brief(b)}")
    return lines


def _brief(layer) -> str:
    if layer is None:
        return "(none)"
    fields = ", ".join(f"{k}: {v}" for k, v in layer.items() if k not in ("type", "layers"))
    return f"{{type: {layer.get('type')}{', ' + fields if fields else ''}}}"
