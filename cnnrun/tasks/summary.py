"""task=summary: print the compiled model; imports no framework."""

from __future__ import annotations

from cnnrun.summary import summary_json, summary_table


def run(ctx) -> None:
    if ctx.cfg.summary.format == "json":
        print(summary_json(ctx.compiled))
    else:
        from rich.console import Console

        table, console = summary_table(ctx.compiled), Console()
        if not console.is_terminal:  # a file or pipe has no width: print the table whole, not cut to 80 columns
            console = Console(width=Console(width=1000).measure(table).maximum)
        console.print(table)
