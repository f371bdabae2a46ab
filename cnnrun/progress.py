"""What the user watches while training: a rich progress bar with live loss/accuracy and images/s, and an
epoch table. Quiet mode (trainer.progress=false) prints one line per epoch instead."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


class ProgressView:
    def __init__(self, enabled: bool, epochs: int):
        self.enabled = enabled
        self.epochs = epochs
        self.table = Table(title="epochs", show_edge=False)
        for column in ("epoch", "train loss", "train acc", "val loss", "val acc", "seconds", "images/s"):
            self.table.add_column(column, justify="right")
        self._progress: Optional[Progress] = None
        self._task = None

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if not self.enabled:
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
        if self._progress is not None:
            stats = f"loss {loss:.4f}  acc {acc:.4f}  {images_per_s:,.0f} img/s"
            self._progress.update(self._task, completed=steps_done, stats=stats)

    def end_epoch(self, row) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        cells = (
            f"{row.epoch + 1}",
            f"{row.train_loss:.4f}",
            f"{row.train_acc:.4f}",
            f"{row.val_loss:.4f}",
            f"{row.val_acc:.4f}",
            f"{row.seconds:.1f}",
            f"{row.images_per_s:,.0f}",
        )
        self.table.add_row(*cells)
        if not self.enabled:
            console.print("epoch " + "  ".join(cells))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled and self.table.row_count:
            console.print(self.table)
