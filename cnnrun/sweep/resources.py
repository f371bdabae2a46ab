"""CPU threads and GPUs for jobs that run in parallel (``hydra/launcher=joblib``).

Without limits, three parallel PyTorch jobs on two cores each start two threads and fight over the cores. A
parallel job whose ``device.threads`` is null gets ``cores // parallel jobs`` (at least 1); with several GPUs a
parallel job on ``device=cuda``/``auto`` without an index gets GPU ``job number % GPU count``. Each backend applies
``device.threads`` and ``device.index`` itself. Neither changes what a job computes, so neither is part of its
config hash (:meth:`cnnrun.context.RunContext.config_hash`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import lru_cache
from typing import Any, Dict, Optional


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_job(cores: int, parallel: int) -> int:
    return max(1, cores // max(1, parallel))


def gpu_for_job(job_num: int, gpus: int) -> Optional[int]:
    """The GPU index for a job, or None when there is no choice to make (0 or 1 GPU)."""
    if gpus <= 1:
        return None
    return job_num % gpus


@lru_cache(maxsize=1)
def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing a framework: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if entries and entries[0].startswith("-"):  # "-1": none
            return 0
        return len(entries)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def assign(raw: Dict[str, Any], job, cores: Optional[int] = None, gpus: Optional[int] = None) -> Dict[str, Any]:
    """The job's config with its share of the machine filled in where the user left it open."""
    if job is None or job.parallel <= 1 or not isinstance(raw.get("device"), dict):
        return raw
    device = dict(raw["device"])
    if device.get("threads") is None:
        device["threads"] = threads_per_job(cpu_cores() if cores is None else cores, job.parallel)
    name = str(device.get("name", "auto"))
    if name in ("cuda", "auto") and device.get("index") is None:
        index = gpu_for_job(job.num, visible_gpus() if gpus is None else gpus)
        if index is not None:
            device["index"] = index
    return {**raw, "device": device}
