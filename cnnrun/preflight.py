"""The checks a run needs before it loads anything heavy: names that must exist, files that must be there.

The config groups and the model spec are checked by their schemas (:mod:`cnnrun.config`, :mod:`cnnrun.spec`);
what is left is what only the surroundings can answer: is the dataset known, is the framework installed, does
the checkpoint ``trainer.resume`` or ``checkpoint`` names exist, is the tracking URI one MLflow understands, can
the framework train on the processes ``trainer.devices`` (or a launcher) asks for (the
sweep objective is checked by its schema, :class:`cnnrun.config.SweepConfig`). Each check reads the raw config (so it still runs when another group
is invalid) and returns :class:`Problem`s, never raises: ``task=validate`` reports them all with the schema's.
Nothing here imports a framework, a dataset module or MLflow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlsplit

from cnnrun.errors import Problem, UserError, did_you_mean, one_of

RUN_TASKS = ("train", "eval", "validate")  # the tasks these checks are for (task=summary needs none of it)

# What MLflow takes as a tracking URI: a local path, or one of these schemes (a database's "+driver" aside).
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def problems(raw: Dict[str, Any]) -> List[Problem]:
    """Every problem the run tasks would meet before training; none for task=summary."""
    if raw.get("task") not in RUN_TASKS:
        return []
    found: List[Problem] = []
    for check in CHECKS:
        found += check(raw)
    return found


def _group(raw: Dict[str, Any], name: str) -> Dict[str, Any]:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _dataset(raw: Dict[str, Any]) -> List[Problem]:
    from cnnrun.data import DATASETS, unknown_dataset

    dataset = _group(raw, "dataset")
    name = dataset.get("name")
    if not isinstance(name, str):
        return []  # a wrong type: the schema says so
    if name not in DATASETS:
        return [Problem("dataset.name", unknown_dataset(name))]
    if name == "folder":
        message = folder_root_problem(dataset.get("root"))
        return [Problem("dataset.root", message)] if message else []
    return []


def folder_root_problem(root: Optional[str]) -> Optional[str]:
    """What is wrong with dataset=folder's ``dataset.root``, or None (the folder dataset raises the same)."""
    if not root:
        return ("required with dataset=folder: a folder with one sub-folder of images per class "
                "(or train/, val/, test/ folders that each hold those)")
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        return f"{root}: {'not a folder' if path.exists() else 'no such folder'}"
    return None


def _framework(raw: Dict[str, Any]) -> List[Problem]:
    """Installed, checked without importing it (find_spec): an unknown name is the options check's problem."""
    from cnnrun.backends import BACKENDS, not_installed

    framework = _group(raw, "framework")
    name = framework.get("name")
    info = BACKENDS.get(name) if isinstance(name, str) else None
    if info is None:
        return []
    needed = info.engine_packages(framework)  # Keras 3 runs on a framework of its own
    missing = [package for package in dict.fromkeys(needed) if importlib.util.find_spec(package) is None]
    return [Problem("framework.name", not_installed(name, package)) for package in missing]


def _precision(raw: Dict[str, Any]) -> List[Problem]:
    """The framework computes in trainer.precision on the device asked for (device=auto: on some device; the
    runner checks again once the framework has resolved it)."""
    from cnnrun.precision import precision_problem

    framework, device = _group(raw, "framework").get("name"), _group(raw, "device").get("name")
    precision = _group(raw, "trainer").get("precision", "fp32")
    if not all(isinstance(v, str) for v in (framework, device, precision)):
        return []  # a wrong type: the schema says so
    message = precision_problem(framework, device.partition(":")[0], precision)
    return [Problem("trainer.precision", message)] if message else []


def _checkpoints(raw: Dict[str, Any]) -> List[Problem]:
    """The checkpoint files the task reads: trainer.resume (train) and checkpoint (eval; validate when set)."""
    found: List[Problem] = []
    task = raw.get("task")
    resume = _group(raw, "trainer").get("resume")
    if resume and task in ("train", "validate"):
        found += _resume_problem(str(resume))
    checkpoint = raw.get("checkpoint")
    if task == "eval" and not checkpoint:
        found.append(Problem("checkpoint", "task=eval needs the checkpoint to evaluate: add checkpoint=PATH "
                                           "(e.g. outputs/<date>/<time>-<model>-<framework>/model.safetensors)"))
    elif checkpoint and task in ("eval", "validate") and not Path(str(checkpoint)).is_file():
        found.append(Problem("checkpoint", f"{checkpoint} does not exist"))
    return found


def _resume_problem(resume: str) -> List[Problem]:
    from cnnrun.resume import LAST, find_last

    if resume == LAST:
        try:
            find_last(Path.cwd())
        except UserError as err:
            return [Problem("trainer.resume", str(err).removeprefix("trainer.resume=last: "))]
        return []
    if not Path(resume).is_file():
        return [Problem("trainer.resume", f"{resume} does not exist; give a run's checkpoints/last.safetensors "
                                          "or trainer.resume=last")]
    return []


def _tracking_uri(raw: Dict[str, Any]) -> List[Problem]:
    tracking = _group(raw, "tracking")
    uri = tracking.get("uri")
    if tracking.get("enabled") is False or not isinstance(uri, str):
        return []
    message = tracking_uri_problem(uri)
    return [Problem("tracking.uri", message)] if message else []


def tracking_uri_problem(uri: str) -> Optional[str]:
    """What is wrong with the form of an MLflow tracking URI, or None; whether it can be reached is the run's."""
    expected = "expected a path, sqlite:///FILE, postgresql://…, mysql://…, http(s)://HOST:PORT or databricks"
    if not uri.strip():
        return f"empty; {expected}"
    parts = urlsplit(uri)
    scheme = parts.scheme.partition("+")[0]
    if len(parts.scheme) <= 1:  # no scheme (a relative or absolute path), or a Windows drive letter
        return None
    if scheme not in TRACKING_SCHEMES:
        return f"unknown scheme '{parts.scheme}'{did_you_mean(scheme, TRACKING_SCHEMES)}; {expected}"
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        return f"{uri!r}: a sqlite URI takes three slashes before its file, e.g. sqlite:///mlflow.db"
    if scheme in ("http", "https") and not parts.netloc:
        return f"{uri!r} names no host; e.g. http://127.0.0.1:5000"
    return None


def _devices(raw: Dict[str, Any]) -> List[Problem]:
    from cnnrun.distributed import devices_problems

    return devices_problems(raw)


CHECKS: List[Callable[[Dict[str, Any]], List[Problem]]] = [
    _dataset,
    _framework,
    _precision,
    _checkpoints,
    _tracking_uri,
    _devices,
]
