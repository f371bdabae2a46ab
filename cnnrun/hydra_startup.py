"""Work Hydra 1.3 does at start-up that cnnrun skips, each time leaving Hydra's answer unchanged.

- **The run mode.** Hydra composes the whole config once only to read ``hydra.mode`` (``Hydra.get_mode``) and
  then composes it again for the run; on a small machine that first pass is a sixth of ``cnnrun task=summary``.
  The mode is ``null`` unless an override or a config file sets it, and then Hydra takes it from ``-m``
  (multirun) or its absence (run). So the first pass is skipped when no override mentions ``hydra.mode`` and no
  YAML file in the config search path's folders (cnnrun's conf/, a ``--config-dir``) has a ``mode:`` key;
  otherwise Hydra's own ``get_mode`` runs.
- **Listing config groups** (``--help``, ``glob()`` choices, shell completion). Each ``get_group_options`` call
  deep-copies the whole config repository before answering, about a hundred times for one ``--help`` (70% of
  its time). The repository does not change within a process, so one copy per (config name, overrides) is
  kept and asked again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional

_MODE_KEY = re.compile(r"\bmode\s*:")


def install() -> None:
    """Wrap ``Hydra.get_mode`` and ``ConfigLoaderImpl.get_group_options`` (hydra-core 1.3 internals) once."""
    from hydra._internal.hydra import Hydra

    if getattr(Hydra.get_mode, "_cnnrun", False):
        return
    _list_groups_from_one_repository()
    original = Hydra.get_mode

    def get_mode(self, config_name: Optional[str], overrides: List[str]) -> Any:
        if any("hydra.mode" in override for override in overrides) or _a_file_may_set_mode(self.config_loader):
            return original(self, config_name, overrides)
        return None

    get_mode._cnnrun = True
    Hydra.get_mode = get_mode


def _list_groups_from_one_repository() -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.object_type import ObjectType

    def get_group_options(self, group_name: str, results_filter: Optional[ObjectType] = ObjectType.CONFIG,
                          config_name: Optional[str] = None, overrides: Optional[List[str]] = None) -> List[str]:
        key = (config_name, tuple(overrides or ()))
        repositories = self.__dict__.setdefault("_cnnrun_repositories", {})
        if key not in repositories:
            _, repositories[key] = self._parse_overrides_and_create_caching_repo(config_name, list(key[1]))
        return repositories[key].get_group_options(group_name, results_filter)

    ConfigLoaderImpl.get_group_options = get_group_options


def _a_file_may_set_mode(config_loader) -> bool:
    """True when a YAML file in a folder of the search path has a ``mode:`` key (or the folders are unknown).

    Hydra's own package and its plugins' configs (pkg:// sources) set no mode; cnnrun's conf/ and a user's
    --config-dir are file:// folders, read here as text (a false alarm only costs the composition saved)."""
    try:
        sources = config_loader.repository.get_sources()
    except AttributeError:  # a Hydra whose internals differ: let it decide
        return True
    for source in sources:
        if source.scheme() != "file":
            continue
        for path in Path(source.path).rglob("*.yaml"):
            try:
                if _MODE_KEY.search(path.read_text(encoding="utf-8", errors="replace")):
                    return True
            except OSError:
                return True
    return False
