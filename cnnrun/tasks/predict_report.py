"""task=predict's results: per file the top-k classes with their probabilities, or why the file was not read; shown
as a rich table and written as CSV or JSON (``predict.output``).

CSV: ``file, class_1, probability_1, …, class_k, probability_k, error`` (one row per file; ``error`` is empty when
the file was read). JSON: ``{"checkpoint", "framework", "top_k", "predictions": [{"file", "top": [{"class",
"index", "probability"}, …]} or {"file", "error"}]}``. Probabilities are written at full float precision.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from rich.table import Table


@dataclass
class Prediction:
    file: str
    top: List[Tuple[int, str, float]] = field(default_factory=list)  # (class index, name, probability), best first
    error: str = ""


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> List[Tuple[int, str, float]]:
    """The ``k`` most probable classes of one image; ties keep the class order."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(i), class_names[i], float(probabilities[i])) for i in order]


def table(predictions: Sequence[Prediction], k: int) -> Table:
    view = Table(show_edge=False)
    view.add_column("file", overflow="fold")
    for rank in range(1, k + 1):
        view.add_column(f"#{rank}" if k > 1 else "class", justify="left")
    for p in predictions:
        if p.error:
            view.add_row(p.file, f"[red]not read: {p.error}[/]", *[""] * (k - 1))
        else:
            view.add_row(p.file, *[f"{name} [dim]{prob:.4f}[/]" for _, name, prob in p.top])
    return view


def write(path: Path, predictions: Sequence[Prediction], k: int, checkpoint: str, framework: str) -> Path:
    """Write ``path`` (.csv or .json) whole or not at all: a temporary file renamed over it."""
    if path.suffix.lower() == ".json":
        text = json.dumps({"checkpoint": checkpoint, "framework": framework, "top_k": k,
                           "predictions": [_as_dict(p) for p in predictions]}, indent=1)
    else:
        text = _csv(predictions, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _as_dict(p: Prediction) -> dict:
    if p.error:
        return {"file": p.file, "error": p.error}
    return {"file": p.file, "top": [{"class": name, "index": i, "probability": prob} for i, name, prob in p.top]}


def _csv(predictions: Sequence[Prediction], k: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file"] + [f"{col}_{rank}" for rank in range(1, k + 1) for col in ("class", "probability")]
                    + ["error"])
    for p in predictions:
        cells = [cell for _, name, prob in p.top for cell in (name, repr(prob))]
        writer.writerow([p.file] + cells + [""] * (2 * k - len(cells)) + [p.error])
    return out.getvalue()
