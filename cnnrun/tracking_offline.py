"""Where a run's tracking goes when the MLflow store stops answering mid-run: plain files in its output folder.

:class:`cnnrun.tracking.MlflowLogger` switches to an :class:`OfflineLog` on the first failed call, so training
finishes and nothing is lost: ``metrics.jsonl`` (one metric per line, with its step), ``params.json``,
``tags.json``, ``artifacts.txt`` (the local files that were to be uploaded; they stay in the output folder) and
``status.json`` (the run's end).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional


class OfflineLog:
    def __init__(self, folder: Path, run_id: Optional[str], uri: str, reason: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._merge("run.json", {"run_id": run_id, "tracking_uri": uri, "offline_since": _now(), "reason": reason})

    def metrics(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        stamp = int(time.time() * 1000)
        with open(self.folder / "metrics.jsonl", "a") as fh:
            for key, value in metrics.items():
                fh.write(json.dumps({"key": key, "value": float(value), "step": step or 0, "timestamp": stamp}) + "\n")

    def params(self, params: Mapping[str, Any]) -> None:
        self._merge("params.json", {k: str(v) for k, v in params.items()})

    def tags(self, tags: Mapping[str, Any]) -> None:
        self._merge("tags.json", {k: str(v) for k, v in tags.items()})

    def artifact(self, path: os.PathLike, artifact_path: Optional[str] = None) -> None:
        with open(self.folder / "artifacts.txt", "a") as fh:
            fh.write(f"{Path(path).resolve()}\t{artifact_path or ''}\n")

    def end(self, status: str, error: Optional[str]) -> None:
        self._merge("status.json", {"status": status, "error": error, "ended": _now()})

    def _merge(self, name: str, data: Mapping[str, Any]) -> None:
        path = self.folder / name
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = {}
        current.update(data)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
        os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
