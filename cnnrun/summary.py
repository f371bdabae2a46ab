"""``task=summary``: every layer's output shape, parameters and FLOPs, as a rich table or JSON. No framework."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from cnnrun.spec import CompiledLayer, CompiledModel, fmt_shape


def summary_rows(model: CompiledModel) -> List[Dict[str, Any]]:
    """One row per layer, depth first; ``label`` is the name below the enclosing block (``conv2d_0``,
    ``shortcut/batchnorm_1``), so nested rows read as an indented tree."""
    rows: List[Dict[str, Any]] = []

    def visit(layers: List[CompiledLayer], parent: str, depth: int) -> None:
        for layer in layers:
            rows.append(
                {
                    "name": layer.name,
                    "label": layer.name[len(parent):],
                    "type": layer.type,
                    "depth": depth,
                    "output_shape": list(layer.out_shape),
                    "params": layer.params,
                    "flops": layer.total_flops,
                }
            )
            visit(layer.children(), layer.name + "/", depth + 1)

    visit(model.layers, "", 0)
    return rows


def summary_dict(model: CompiledModel) -> Dict[str, Any]:
    return {
        "model": model.name,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "layers": summary_rows(model),
        "total_params": model.params,
        "batchnorm_statistics": model.statistics,
        "total_flops": model.flops,
    }


def summary_json(model: CompiledModel) -> str:
    return json.dumps(summary_dict(model), indent=2)


def summary_table(model: CompiledModel):
    from rich.table import Table

    table = Table(title=f"{model.name}: input {fmt_shape(model.input_shape)}, {model.num_classes} classes")
    table.add_column("layer", overflow="fold")  # a long repeated name wraps; an ellipsis would hide which it is
    table.add_column("type")
    table.add_column("output", justify="right")
    table.add_column("params", justify="right")
    table.add_column("FLOPs/image", justify="right")
    for row in summary_rows(model):
        indent = "  " * row["depth"]
        table.add_row(
            indent + row["label"],
            row["type"],
            fmt_shape(row["output_shape"]),
            f"{row['params']:,}",
            f"{row['flops']:,}",
        )
    table.add_section()
    table.add_row("total", "", fmt_shape(model.output_shape), f"{model.params:,}", f"{model.flops:,}")
    table.caption = (f"{model.params:,} trainable parameters; batchnorm running statistics: {model.statistics:,} "
                     "more values (Keras counts them as non-trainable parameters)")
    return table


def summary_text(model: CompiledModel) -> str:
    """The table as plain text, for the MLflow artifact."""
    from rich.console import Console

    console = Console(width=110, record=True, file=open("/dev/null", "w"))
    console.print(summary_table(model))
    return console.export_text()
