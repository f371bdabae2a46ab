"""What the user watches while training.

In a terminal: a rich progress bar with live loss/accuracy and images/s, and an epoch table at the end. When
stderr is not a terminal (a CI log, a batch job's log file, a pipe) a live bar cannot redraw itself and leaves
blank lines behind, so plain lines are printed instead: a progress line at most every ``PLAIN_EVERY_S`` seconds
and one line per epoch, never an empty one. Quiet mode (trainer.progress=false) prints the epoch lines only.
"""

from __future__ import annotations

import time
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)  # soft wrap: a log line is never cut into pieces at 80 columns

COLUMNS = ("epoch", "train loss", "train acc", "val loss", "val acc", "seconds", "images/s")
PLAIN_EVERY_S = 10.0  # seconds between progress lines in a log; the first update of a run always prints


class ProgressView:
    def __init__(self, enabled: bool, epochs: int):
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.plain = enabled and not console.is_terminal
        self.epochs = epochs
        self.table = Table(title="epochs", show_edge=False)
        for column in COLUMNS:
            self.table.add_column(column, justify="right")
        self._progress: Optional[Progress] = None
        self._task = None
        self._epoch = 0
        self._steps = 0
        self._last_line = -float("inf")

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        self._epoch, self._steps = epoch, steps
        if not self.live:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{self.epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done, stats="")

    def update(self, steps_done: int, loss: float, acc: float, images_per_s: float) -> None:
        stats = f"loss {loss:.4f}  acc {acc:.4f}  {images_per_s:,.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=steps_done, stats=stats)
        elif self.plain and time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._last_line = time.monotonic()
            console.print(f"epoch {self._epoch + 1}/{self.epochs}  step {steps_done}/{self._steps}  {stats}",
                          highlight=False)

    def end_epoch(self, row) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        cells = (
            f"{row.epoch + 1}",
            f"{row.train_loss:.4f}",
            f"{row.train_acc:.4f}",
            "–" if row.val_loss is None else f"{row.val_loss:.4f}",
            "–" if row.val_acc is None else f"{row.val_acc:.4f}",
            f"{row.seconds:.1f}",
            f"{row.images_per_s:,.0f}",
        )
        self.table.add_row(*cells)
        if not self.live:  # one labelled line per epoch: what a log keeps of the table
            labelled = "  ".join(f"{name} {cell}" for name, cell in zip(COLUMNS[1:], cells[1:]))
            console.print(f"epoch {row.epoch + 1}/{self.epochs}  {labelled}", highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.live and self.table.row_count:
            console.print(self.table)


class ItemProgress:
    """Progress through a known number of items (task=predict's images): a transient rich bar on a terminal,
    else a plain line at about every tenth, so logs and pipes get readable lines instead of redraws."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0
        self._next_line = 0
        self._progress: Optional[Progress] = None

    def __enter__(self) -> "ItemProgress":
        if self.enabled and console.is_terminal:
            self._progress = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=console, transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def advance(self, count: int) -> None:
        self.done += count
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        elif self.enabled and (self.done >= self._next_line or self.done >= self.total):
            console.print(f"{self.label} {self.done}/{self.total}", highlight=False)
            self._next_line = self.done + max(1, self.total // 10)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class SilentView:
    """The view of a process that shows nothing (the ranks other than 0 of a multi-process run)."""

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None: ...

    def update(self, steps_done: int, loss: float, acc: float, images_per_s: float) -> None: ...

    def end_epoch(self, row) -> None: ...

    def close(self) -> None: ...
