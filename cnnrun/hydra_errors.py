"""Config-composition errors as one short message, not Hydra's traceback.

Hydra composes the config before cnnrun's task function runs, so a YAML syntax error in a user's model file or a
bad override is raised inside Hydra. Hydra's reporter prints a full traceback for some of these; this wraps it so
that such user mistakes print ``cnnrun: <what, where>`` and exit 2. Anything else keeps Hydra's reporting.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, List, Optional

from cnnrun.errors import did_you_mean, one_of


def describe(error: BaseException) -> Optional[str]:
    """A one-paragraph description of a user-caused composition error, or None for anything else."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cnnrun.errors import TrainingInterrupted, UserError

    if isinstance(error, (UserError, TrainingInterrupted)):  # raised by a sweep job (Hydra re-raises the first)
        return str(error)

    chain = []
    current: Optional[BaseException] = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in chain:
        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a YAML file"
            what = exc.problem or exc.context or "invalid YAML"
            hint = ""
            if mark is not None and "${" in _line(mark.name, mark.line):
                hint = '; quote interpolations inside {...} mappings, e.g. {type: dense, units: "${dataset.num_classes}"}'
            return f"YAML syntax error in {where}: {what}{hint}"
    for exc in chain:
        translated = _missing_choice(exc) or _missing_key(exc, error)
        if translated:
            return translated
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        text = str(error).strip()
        cause = error.__cause__
        if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
            text += "\n" + str(cause).strip()
        return text
    return None


def _missing_choice(exc: BaseException) -> Optional[str]:
    """``model=nope``, ``hydra/launcher=nope``: the group, its choices and the close one, not Hydra's search path."""
    from hydra.errors import MissingConfigException

    if not isinstance(exc, MissingConfigException) or "/" not in (exc.missing_cfg_file or ""):
        return None
    group, _, choice = exc.missing_cfg_file.rpartition("/")
    options = list(exc.options or [])
    available = f"available: {one_of(options)}" if options else "the group has no choices"
    return (f"{group}={choice}: config group '{group}' has no choice '{choice}' (no {group}/{choice}.yaml in cnnrun's "
            f"conf/ or a --config-dir){did_you_mean(choice, options)}; {available}")


def _missing_key(exc: BaseException, error: BaseException) -> Optional[str]:
    """``trainer.epoch=3``: OmegaConf's "not in struct" (or index out of range) as the key, what exists there and
    the close match. The parent node OmegaConf attaches to its error holds the keys that do exist."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import ConfigAttributeError, ConfigIndexError, ConfigKeyError

    parent = getattr(exc, "parent_node", None)
    full_key = getattr(exc, "full_key", None)
    if not full_key or parent is None:
        return None
    override = re.search(r"Could not override '[^']*'\.\s*To append to your config use \+(\S+)", str(error))
    setting = override.group(1) if override else full_key
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and isinstance(parent, DictConfig):
        key = str(getattr(exc, "key", full_key))
        keys = [str(k) for k in parent.keys() if str(k) != "hydra"]
        owner = full_key[: -len(key)].rstrip(".") if full_key.endswith(key) else ""
        where = f"{owner} has" if owner else "the config has"
        close = did_you_mean(key, keys)
        add = "" if close else f" (a key that is not there yet is added with +{setting})"
        return f"{setting}: {where} no key '{key}'{close}; its keys: {', '.join(keys)}{add}"
    if isinstance(exc, ConfigIndexError) and isinstance(parent, ListConfig):
        return f"{setting}: past the end of a list of {len(parent)} items (indices 0 to {len(parent) - 1})"
    return None


def _line(path: str, index: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()[index]
    except (OSError, IndexError):
        return ""


_error_hooks: List[Callable[[BaseException], None]] = []


def install(on_error: Optional[Callable[[BaseException], None]] = None) -> None:
    """Wrap Hydra's reporter (hydra-core 1.3's internal ``run_and_report``) once per process.

    ``on_error(err)`` runs before any error is reported (cnnrun.cli: summarise a sweep Hydra stopped).
    """
    from hydra._internal import utils

    if on_error is not None and on_error not in _error_hooks:
        _error_hooks.append(on_error)
    if getattr(utils.run_and_report, "_cnnrun", False):
        return
    original: Callable[[Callable[[], Any]], Any] = utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except Exception as err:
                for hook in list(_error_hooks):
                    hook(err)
                message = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else describe(err)
                if message is None:
                    raise
                print(f"cnnrun: {message}", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report._cnnrun = True
    utils.run_and_report = run_and_report
