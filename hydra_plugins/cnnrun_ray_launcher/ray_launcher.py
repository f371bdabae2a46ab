"""A Hydra launcher that runs each sweep job as a Ray task, on a running Ray cluster or on a Ray instance it starts
on this machine. Ray places the tasks; this only submits them and collects what Hydra expects back.

Its settings have the shape of Hydra's own hydra-ray-launcher (``ray.init``: ray.init's arguments, ``address``
among them; ``ray.remote``: each task's resources, ``num_cpus``, ``num_gpus``, ...). That plugin cannot be installed
beside cnnrun's lock: every release requires cloudpickle < 3, and joblib 1.6 (the joblib launcher's) requires
cloudpickle >= 3. What its RayLauncher does is the few lines below; Ray brings a cloudpickle of its own.

Nothing here imports Ray until a sweep launches: Hydra imports every plugin module at start-up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class RayLauncher(Launcher):
    def __init__(self, ray: DictConfig) -> None:
        self.ray_cfg = ray
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():  # once per sweep: an Optuna search launches a batch at a time
            _connect(ray, _settings(self.ray_cfg.get("init")))
        remote_options = _settings(self.ray_cfg.get("remote"))
        task = ray.remote(**remote_options)(_run_job) if remote_options else ray.remote(_run_job)
        log.info(f"Ray launcher: {len(job_overrides)} jobs on {ray.get_runtime_context().gcs_address}, "
                 f"sweep output dir: {sweep_dir}")
        pending, configs = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"ray_job_{idx}"
                sweep_config.hydra.job.num = idx
            pending.append(task.remote(self.hydra_context, sweep_config, self.task_function, Singleton.get_state()))
            configs.append((list(overrides), sweep_config))
        return [_result(ref, overrides, cfg) for ref, (overrides, cfg) in zip(pending, configs)]


def _result(ref, overrides, sweep_config: DictConfig) -> JobReturn:
    """The job's JobReturn; a worker that died (killed, out of memory) fails that job, not the whole batch."""
    import ray
    from hydra.core.utils import JobStatus

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        failed = JobReturn(overrides=overrides, cfg=sweep_config, status=JobStatus.FAILED)
        failed.return_value = err
        return failed


def _connect(ray, init: Dict[str, Any]) -> None:
    """ray.init, with a cluster that cannot be reached (address, token authentication) as a user error."""
    from cnnrun.errors import UserError

    address = init.get("address")
    unreachable = _unreachable(str(address)) if address else None
    if unreachable:  # Ray itself would retry for minutes before it gives up
        raise UserError(f"hydra.launcher.ray.init.address={address}: nothing answers there ({unreachable})\n"
                        "  start the cluster (ray start --head on that node) or fix the address")
    try:
        ray.init(**init)
    except Exception as err:  # Ray raises ConnectionError, RuntimeError or its own errors here
        cause = err.__cause__ or err
        reason = next((line for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise UserError(
            f"hydra.launcher.ray.init.address={init.get('address')}: Ray cannot connect: {reason[:400]}\n"
            "  start the cluster (ray start --head), fix the address, and where the cluster uses token "
            "authentication set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        ) from None


def _unreachable(address: str, timeout: float = 5.0) -> Optional[str]:
    """Why a HOST:PORT address takes no connection, or None (also for Ray's own words: auto, local, ray://...)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def _settings(node: Any) -> Dict[str, Any]:
    """A ``ray.init``/``ray.remote`` node as keyword arguments; null values are left to Ray's defaults."""
    if node is None:
        return {}
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return {k: v for k, v in data.items() if v is not None}


def _run_job(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction,
             singleton_state: Dict[Any, Any]) -> JobReturn:
    """In the Ray worker: run the job as Hydra's basic launcher would in the driver."""
    # A Ray worker starts in Ray's session folder; relative paths in the config (the sweep directory, a dataset
    # root) mean the driver's working directory, which a cluster shares with every node.
    driver_cwd = str(sweep_config.hydra.runtime.cwd)
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    setup_globals()
    Singleton.set_state(singleton_state)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

