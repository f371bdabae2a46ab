"""The ``cnnrun`` command: a Hydra app. Compose → validate → run the task; user errors exit 2 with no traceback.

Start-up time counts (``benchmarks/bench_startup.py``): ``--version`` answers before Hydra is imported, Hydra
composes the config once and lists config groups cheaply (:mod:`cnnrun.hydra_startup`), and each task imports
only what it uses.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from cnnrun.errors import TrainingInterrupted, UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _sources() -> Dict[str, str]:
    """Which file each chosen config group came from, for error messages ('' is the primary config)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    sources: Dict[str, str] = {}
    for group, choice in list(hc.runtime.choices.items()) + [("", hc.job.config_name)]:
        if group.startswith("hydra") or choice is None:
            continue
        relative = f"{group}/{choice}.yaml" if group else f"{choice}.yaml"
        for source in hc.runtime.config_sources:
            if source.schema == "file" and (Path(source.path) / relative).is_file():
                sources[group] = _pretty(Path(source.path) / relative)
                break
        else:
            sources[group] = f"cnnrun's conf/{relative}"
    return sources


def _pretty(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnnrun.context import RunContext
    from cnnrun.sweep import job as sweep_job
    from cnnrun.sweep.resources import assign
    from cnnrun.tasks import TASKS

    job = sweep_job.from_hydra()  # None in a single run
    sweep_job.begin(job)
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"the config cannot be resolved: {str(err).splitlines()[0]}") from None
    raw = assign(raw, job)  # parallel sweep jobs: their share of CPU threads, their own GPU
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    ctx = RunContext.create(raw, output_dir, _sources(), _overrides())
    return importlib.import_module(TASKS[ctx.cfg.task]).run(ctx)


def _config_dir() -> str:
    """The shipped conf/: inside the package when installed from a wheel, beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


def _task(cfg: DictConfig):
    """What Hydra runs for each job: the task, with user errors reported as one message and exit code 2."""
    try:
        return run_task(cfg)
    except (UserError, TrainingInterrupted) as err:
        if os.environ.get("CNNRUN_DEBUG"):
            raise
        message = err.render() if isinstance(err, UserError) else f"cnnrun: {err}"
        if isinstance(err, UserError) or _is_main_rank():  # an interrupted run is reported once, by rank 0
            print(message, file=sys.stderr)
        if _is_multirun():
            if isinstance(err, TrainingInterrupted) and "trainer.max_time" not in str(err):
                raise KeyboardInterrupt from err  # Ctrl-C/SIGTERM stops the whole sweep, not just this job
            raise  # the sweep records this job as failed and goes on
        sys.exit(err.exit_code)


def _is_main_rank() -> bool:
    from cnnrun.distributed.world import detect_world

    try:
        return detect_world().is_main
    except UserError:
        return True


def _sweep_failed(err: BaseException) -> None:
    from cnnrun.sweep.callback import finish_active

    finish_active("FAILED")


def _describe_version_flag() -> None:
    """--help lists Hydra's flags; --version is answered by :func:`main` before Hydra sees it, so say what it does."""
    hydra_main_module = sys.modules["hydra.main"]  # the module: ``hydra.main`` is also the decorator's name
    if getattr(hydra_main_module.get_args_parser, "_cnnrun", False):
        return
    original = hydra_main_module.get_args_parser

    def get_args_parser():
        parser = original()
        for action in parser._actions:
            if "--version" in action.option_strings:
                action.help = "Show cnnrun's version and its stack's, and exit"
        return parser

    get_args_parser._cnnrun = True
    hydra_main_module.get_args_parser = get_args_parser


def main():
    """Console entry point: Hydra's app with cnnrun's error reporting."""
    if "--version" in sys.argv[1:]:  # cnnrun's version (not Hydra's), without importing Hydra or composing
        from cnnrun.version import report

        print(report())
        return None
    import hydra

    from cnnrun import hydra_errors, hydra_startup
    from cnnrun.sweep.callback import finish_active

    # conf/hydra/launcher/submitit_*.yaml share their names with the plugin's schemas, which check their keys;
    # Hydra warns about that matching on every start
    warnings.filterwarnings("ignore", message="(?s).*validated against ConfigStore schema with the same name")

    from cnnrun.distributed.launch import die_with_launcher, rank_hydra_args

    die_with_launcher()  # a worker that cnnrun launched does not outlive its launcher
    sys.argv += rank_hydra_args()  # ranks other than 0 write nothing: no output folder of their own
    hydra_errors.install(on_error=_sweep_failed)
    hydra_startup.install()
    _describe_version_flag()
    app = hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")(_task)
    try:
        return app()
    except KeyboardInterrupt:
        finish_active("KILLED")
        print("cnnrun: interrupted", file=sys.stderr)
        sys.exit(TrainingInterrupted.exit_code)
    finally:
        finish_active("FAILED")  # a sweep Hydra stopped without on_multirun_end: still summarised (else no-op)


if __name__ == "__main__":
    main()
