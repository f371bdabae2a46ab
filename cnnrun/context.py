"""What every task starts from: the validated config, the compiled model and where things go."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from pydantic import ValidationError

from cnnrun.config import DatasetConfig, RunConfig, validate_run_config
from cnnrun.errors import ConfigError, Problem
from cnnrun.schedules import validate_schedule
from cnnrun.spec import CompiledModel, compile_model


@dataclass
class RunContext:
    cfg: RunConfig
    raw: Dict[str, Any]  # the resolved config as plain data (what gets logged)
    output_dir: Path
    model_source: str = "model"  # e.g. "conf/model/classic_cnn.yaml", for error messages
    overrides: List[str] = field(default_factory=list)
    compiled: CompiledModel = None

    @classmethod
    def create(cls, raw: Dict[str, Any], output_dir: Path, sources: Dict[str, str], overrides: List[str]):
        """Validate everything (config groups, framework options, the model spec) before anything loads."""
        from cnnrun import preflight

        problems: List[Problem] = []
        model_source = sources.get("model", "model")
        cfg = None
        try:
            cfg = validate_run_config(raw, "the config")
        except ConfigError as err:
            problems += err.problems
        try:  # the framework too, so that one message lists every problem
            _check_framework(cfg, raw)
        except ConfigError as err:
            problems += err.problems
        try:
            validate_schedule(raw.get("schedule"))
        except ConfigError as err:
            problems += err.problems
        try:  # the spec too, so that one message lists every problem
            dataset = cfg.dataset if cfg else DatasetConfig.model_validate(raw.get("dataset"))
            compiled = compile_model(raw.get("model"), dataset.input_shape, dataset.num_classes, model_source)
        except ConfigError as err:
            problems += err.problems
        except ValidationError:
            compiled = None  # the dataset group is invalid: already reported above
        problems += preflight.problems(raw)  # what the run itself needs: dataset, framework install, files, ...
        if problems:
            only_model = all(p.key.startswith("model.") for p in problems)
            header = model_source if only_model else "the config"
            located = [_locate(p, sources, overrides) for p in problems]
            located = [Problem(p.key, p.message, "" if p.where == header else p.where) for p in located]
            raise ConfigError(located, header)
        return cls(cfg, raw, output_dir, model_source, overrides, compiled)

    @property
    def schedule(self):
        """The ``schedule`` group as typed settings (validated in :meth:`create`)."""
        return validate_schedule(self.cfg.schedule)

    @property
    def framework_options(self):
        from cnnrun.backends import validate_options

        return validate_options(self.cfg.framework.name, self.cfg.framework.options())

    def config_hash(self) -> str:
        """Identifies what a run computes, to skip finished sweep jobs (cnnrun.sweep.resume).

        Left out: where results go and how they are shown (tracking, sweep, summary, trainer.progress),
        task=predict's settings (inputs, predict), and the CPU threads and GPU index a parallel sweep hands each
        job (cnnrun.sweep.resources), which differ between identical jobs of two invocations. Hydra's output
        directory is not part of the config.
        """
        relevant = {k: v for k, v in self.raw.items() if k not in HASH_IGNORED_GROUPS}
        for group, key in HASH_IGNORED_KEYS:
            if isinstance(relevant.get(group), dict):
                relevant[group] = {k: v for k, v in relevant[group].items() if k != key}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


HASH_IGNORED_GROUPS = ("tracking", "sweep", "summary", "predict", "inputs", "export")
HASH_IGNORED_KEYS = (("trainer", "progress"), ("device", "threads"), ("device", "index"))


def _check_framework(cfg, raw: Dict[str, Any]) -> None:
    """The framework and its options suit the task; from the raw config when the rest of it is invalid."""
    from cnnrun.backends import check_framework

    if cfg is not None:
        check_framework(cfg.task, cfg.framework.name, cfg.framework.options())
        return
    framework = raw.get("framework")
    if not isinstance(framework, dict) or not isinstance(framework.get("name"), str):
        return  # reported by the config's own validation
    check_framework(str(raw.get("task")), framework["name"], {k: v for k, v in framework.items() if k != "name"})


def _locate(problem: Problem, sources: Dict[str, str], overrides: List[str]) -> Problem:
    """Say where a bad value came from: the command-line override that set it, else its group's file."""
    dotted = problem.key.replace("[", ".").replace("]", "")
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in sources:  # a group choice (model=my_net): the file below says more
            continue
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
            return Problem(problem.key, problem.message, f"command line: {override}")
    group = dotted.split(".", 1)[0]
    where = sources.get(group, "")
    return Problem(problem.key, problem.message, where if group else "")
