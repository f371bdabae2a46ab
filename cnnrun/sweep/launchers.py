"""Which Hydra launchers run a sweep's jobs on other machines, and what such a sweep needs from tracking.

Jobs on other machines (SLURM through submitit, a Ray cluster) cannot write to a tracking store that is a file
on the machine where the sweep started: a ``sqlite:`` database or a local folder. Such a sweep is refused before
any job is submitted. The basic and joblib launchers, submitit_local and a Ray instance started here
(``hydra/launcher=ray_local``) keep every job on this machine.
"""

from __future__ import annotations

from typing import Optional

from cnnrun.errors import ConfigError, Problem

# Launcher classes (the end of hydra.launcher._target_) whose jobs may run on other machines.
REMOTE_LAUNCHERS = ("SlurmLauncher",)
RAY_LAUNCHER = "RayLauncher"
LOCAL_RAY_ADDRESSES = (None, "", "local")  # ray.init starts a Ray instance on this machine


def runs_elsewhere(launcher) -> bool:
    """True when the launcher config (``hydra.launcher``) may place jobs on other machines."""
    cls = str(launcher.get("_target_", "")).rsplit(".", 1)[-1]
    if cls in REMOTE_LAUNCHERS:
        return True
    if cls == RAY_LAUNCHER:
        init = (launcher.get("ray") or {}).get("init") or {}
        return init.get("address") not in LOCAL_RAY_ADDRESSES
    return False


def local_store(uri: str) -> bool:
    """A tracking URI that is a file on this machine: sqlite:, file:, or a plain path."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def check_tracking(config) -> None:
    """Before a sweep starts: refuse a local tracking store when jobs may run on other machines."""
    tracking = config.tracking
    if not tracking.enabled or not runs_elsewhere(config.hydra.launcher):
        return
    uri = str(tracking.uri)
    if not local_store(uri):
        return
    choice = config.hydra.runtime.choices.get("hydra/launcher")
    raise ConfigError([Problem(
        "tracking.uri",
        f"'{uri}' is a file on this machine, but hydra/launcher={choice} runs jobs on other machines, which cannot "
        "write to it; use an MLflow tracking server that every node reaches (tracking.uri=http://HOST:5000, see "
        "the README's 'Tracking servers and the MLflow UI'), a shared database (postgresql+psycopg2://...), "
        "or tracking.enabled=false",
        _where(config),
    )])


def _where(config) -> str:
    for override in config.hydra.overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if key in ("tracking.uri", "tracking"):
            return f"command line: {override}"
    choice: Optional[str] = config.hydra.runtime.choices.get("tracking")
    return f"tracking={choice} (conf/tracking/{choice}.yaml)" if choice else ""
