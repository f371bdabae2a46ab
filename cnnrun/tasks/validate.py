"""task=validate: check the config and the spec, infer shapes, and say so; trains nothing."""

from __future__ import annotations

from cnnrun.spec import fmt_shape


def run(ctx) -> None:
    model = ctx.compiled
    print(
        f"ok: {model.name} ({ctx.model_source}) compiles for {fmt_shape(model.input_shape)} inputs: "
        f"{len(list(model.walk()))} layers, {model.params:,} parameters, output {fmt_shape(model.output_shape)}"
    )
