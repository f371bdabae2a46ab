"""Helpers the tests share: the CLI as a subprocess, shipped model specs, reading MLflow runs back."""

from __future__ import annotations

import copy
import functools
import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CNNRUN = [sys.executable, "-m", "cnnrun"]


def framework_engines():
    """(id, framework, options) for every framework of cnnrun.backends.BACKENDS, once per engine (Keras: once per
    Keras backend), e.g. ("keras-torch", "keras", {"backend": "torch"})."""
    from cnnrun.backends import BACKENDS

    for name, info in BACKENDS.items():
        for options in info.engines:
            yield "-".join([name, *map(str, options.values())]), name, options


def framework_params():
    """pytest params of the CLI arguments that pick each framework engine (see :func:`framework_engines`);
    skipped, with the reason, where its backend module or package is missing."""
    import pytest

    from cnnrun.backends import BACKENDS

    params = []
    for label, name, options in framework_engines():
        info = BACKENDS[name]
        args = [f"framework={name}"] + [f"framework.{key}={value}" for key, value in options.items()]
        missing = [m for m in (info.module, *info.engine_packages(options)) if importlib.util.find_spec(m) is None]
        marks = [pytest.mark.skip(reason=f"{', '.join(missing)} missing")] if missing else []
        params.append(pytest.param(args, id=label, marks=marks))
    return params


def shipped_model(name: str, num_classes: int = 10) -> Dict:
    """A conf/model/*.yaml as plain data, with ${dataset.num_classes} resolved."""
    data = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    for layer in data["layers"]:
        if layer.get("units") == "${dataset.num_classes}":
            layer["units"] = num_classes
    return data


def shipped_models() -> List[str]:
    return sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def torch_sees_a_gpu() -> bool:
    """Whether PyTorch can use a CUDA GPU here, where ``device=auto`` would then train on it. Without NVIDIA
    device files there is none, and torch is not even imported."""
    if not glob.glob("/dev/nvidia[0-9]*") or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


GPU_SKIP_REASON = "a CUDA GPU is visible to PyTorch, so device=auto would not mean the CPU here"


def run_cli(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, timeout: int = 600):
    """Run `cnnrun ARGS` in a fresh process, as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop("CNNRUN_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(CNNRUN + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_launcher(command: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``command``, a launcher of worker processes (torch's elastic agent, Open MPI's mpiexec), like
    ``subprocess.run``; a run that is not done in ``timeout`` seconds fails the test with its output so far, and
    leaves no process behind.

    ``subprocess.run``'s own timeout SIGKILLs the launcher alone, and torch's launcher starts each worker in a session
    of its own: the workers went on training, on a machine already too busy, after the test had failed. SIGTERM makes
    the launcher stop its workers and wait for them; SIGKILL follows if it has not exited a minute later."""
    import pytest

    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, command))} was not done after {timeout:.0f} s; it printed:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def mlflow_runs(uri: str, experiment: str = "cnnrun"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def composed_config(overrides: List[str] = ()) -> Dict:
    """The shipped config composed by Hydra, as plain data, like the CLI's (without its ``hydra`` section)."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple) -> Dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)
