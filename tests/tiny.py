"""Settings that make a training job take seconds (tiny model, 500 training images, one epoch), and small helpers
the sweep, tracking-server and UI tests share."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional

TINY = [
    "model.layers.0.filters=4",
    "model.layers.2.filters=4",
    "model.layers.5.units=16",
    "dataset.val_fraction=0.3",
    "dataset.test_fraction=0.6",
    "trainer.epochs=1",
    "trainer.progress=false",
    "device=cpu",
    "tracking.log_model=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, log: Path, what: str, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; raise with the end of ``log`` if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"{what} did not answer after {timeout}s:\n{log.read_text()[-3000:]}")


def kill_group(process: subprocess.Popen) -> None:
    """Kill a server started with ``start_new_session=True`` with its whole process group (workers too)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def rest(base_url: str, endpoint: str, payload: Optional[Dict[str, Any]] = None, timeout: float = 30) -> Dict:
    """Call the MLflow REST API (``endpoint`` like 'runs/search'): POST with ``payload``, else GET."""
    url = f"{base_url.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def rest_runs(base_url: str, experiment: str = "cnnrun"):
    """Every run of an experiment through the REST API, each as {'info', 'tags', 'metrics', 'params'} dicts."""
    exp = rest(base_url, f"experiments/get-by-name?experiment_name={experiment}")["experiment"]
    found = rest(base_url, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})
    runs = []
    for run in found.get("runs", []):
        data = run.get("data", {})
        runs.append({
            "info": run["info"],
            "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
            "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
            "params": {p["key"]: p["value"] for p in data.get("params", [])},
        })
    return exp, runs
