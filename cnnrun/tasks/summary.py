"""task=summary: print the compiled model; imports no framework."""

from __future__ import annotations

from cnnrun.summary import summary_json, summary_table


def run(ctx) -> None:
    if ctx.cfg.summary.format == "json":
        print(summary_json(ctx.compiled))
    else:
        from rich.console import Console

        Console().print(summary_table(ctx.compiled))
