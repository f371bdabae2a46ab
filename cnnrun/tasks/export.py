"""task=export: write a checkpoint of any framework as ONNX, TorchScript, a SavedModel or a Keras file.

    cnnrun task=export checkpoint=outputs/…/model.safetensors export.format=onnx

The model comes from the checkpoint (its stored spec, validated like a user's), as for task=eval. The file goes
beside the checkpoint (model.safetensors → model.onnx, model.pt, model.savedmodel/, model.keras) unless
``export.output=PATH`` says otherwise, and replaces an earlier export only once it is complete.
"""

from __future__ import annotations

from pathlib import Path

from cnnrun import checkpoint as ckpt_io
from cnnrun import export
from cnnrun.backends import validate_options
from cnnrun.errors import UserError
from cnnrun.progress import console
from cnnrun.spec import fmt_shape
from cnnrun.tasks.evaluate import load_model


def run(ctx) -> str:
    """Export ``checkpoint=`` in ``export.format``; return the path written."""
    cfg = ctx.cfg
    name = cfg.export.format
    fmt = export.FORMATS[name]
    framework = _framework(ctx, name)
    if not cfg.checkpoint:
        raise UserError(f"task=export needs the checkpoint to export: add checkpoint=PATH "
                        f"(e.g. outputs/<date>/<time>-<model>-<framework>/model.safetensors)")
    path = Path(cfg.checkpoint)
    ckpt = ckpt_io.load(path)
    compiled = load_model(ckpt, path)
    target = Path(cfg.export.output) if cfg.export.output else export.default_output(path, name)
    if fmt.suffix == ".keras" and target.suffix != ".keras":
        raise UserError(f"export.output={target}: Keras writes only files named *.keras; choose such a name")
    options = None
    if framework is not None:
        explicit = framework == cfg.framework.name
        options = ctx.framework_options if explicit else validate_options(framework, {})
    export.write(name, ckpt, compiled, target, options)
    c, h, w = compiled.input_shape
    by = f"with {framework}" if framework else f"from the spec alone (opset {_onnx_opset()})"
    console.print(
        f"wrote [bold]{target}[/] ({fmt.description}; {by}): uint8 images (N, {h}, {w}, {c}) → "
        f"logits (N, {len(ckpt.class_names)}) for {compiled.name} ({fmt_shape(compiled.input_shape)})"
    )
    return str(target)


def _framework(ctx, format_name: str):
    """The framework that writes the format; a ``framework=`` given on the command line must be that one."""
    chosen = any(o.split("=", 1)[0].lstrip("+~") in ("framework", "framework.name") for o in ctx.overrides)
    if chosen:
        export.check_framework(format_name, ctx.cfg.framework.name)
    return export.FORMATS[format_name].framework


def _onnx_opset() -> int:
    from cnnrun.export.onnx import OPSET

    return OPSET
