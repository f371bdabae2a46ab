"""Changes to plain config data addressed by index, as ``repeat``'s per-repetition ``overrides`` write them.

A mapping whose keys are indices (ints from YAML, digit strings from Hydra's command line) changes single items of a
list; a mapping over a mapping changes single keys; any other value replaces what was there.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from cnnrun.errors import Problem


def as_index(key: Any) -> Optional[int]:
    """0 or "0" → 0; anything else (a name, a negative number, a bool) → None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    return int(key) if isinstance(key, str) and key.isdigit() else None


def index_keyed(value: Any, what: str) -> Dict[int, Any]:
    """{0: a, "1": b} → {0: a, 1: b}. An index given both ways (in YAML, then added on the command line) is merged,
    the later winning where both change the same thing."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping from {what} index to changes; received {value!r}")
    merged: Dict[int, Any] = {}
    for key, change in value.items():
        index = as_index(key)
        if index is None:
            raise ValueError(f"keys are {what} indices (0, 1, …); received {key!r}")
        merged[index] = merge(merged[index], change) if index in merged else change
    return merged


def merge(base: Any, change: Any) -> Any:
    """Two changes to the same place into one: mappings key by key, anything else the later one."""
    if isinstance(base, dict) and isinstance(change, dict):
        out = dict(base)
        for key, value in change.items():
            out[key] = merge(out[key], value) if key in out else value
        return out
    return change


def apply(base: Any, change: Any, key: str, problems: List[Problem]) -> Any:
    """``base`` with ``change`` applied (neither is modified); a change to a list item that does not exist is a
    problem under ``key``, the dotted key of ``base``."""
    if isinstance(change, dict) and isinstance(base, list):
        out = list(base)
        for item, value in change.items():
            index = as_index(item)
            if index is None or index >= len(out):
                problems.append(Problem(f"{key}[{item}]", f"no such item: the list has {len(out)} "
                                        f"(indices 0–{len(out) - 1})"))
                continue
            out[index] = apply(out[index], value, f"{key}[{index}]", problems)
        return out
    if isinstance(change, dict) and isinstance(base, dict):
        out = dict(base)
        for item, value in change.items():
            out[item] = apply(out[item], value, f"{key}.{item}", problems) if item in out else value
        return out
    return change
