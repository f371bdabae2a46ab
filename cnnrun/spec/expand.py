"""Expand ``repeat`` layers: the tree of layers a model really has, each with its canonical name and config key.

Names are deterministic, so checkpoints stay stable: a layer is ``<name>`` or ``<type>_<index in its list>``,
below its residual block (``residual_5/conv2d_1``, ``residual_5/shortcut/batchnorm_1``) and below its repetition
(repetition k of a repeat named N: ``N_k/<layer name>``). Keys say where a layer came from in the config:
``model.layers[5].layers[0]`` for repeated layers as written, ``model.layers[5].overrides[1][0]`` for those of a
repetition that ``overrides`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from pydantic import TypeAdapter, ValidationError

from cnnrun.errors import Problem
from cnnrun.spec import patch
from cnnrun.spec.layers import SPEC_TYPES, AnyLayer, LayerSpec, Repeat, Residual
from cnnrun.spec.validation import problems_from

_LAYER_LIST = TypeAdapter(List[AnyLayer])


@dataclass
class Entry:
    """One layer of the expanded tree: its spec, canonical name and config key."""

    spec: LayerSpec
    name: str
    key: str
    repetition: str = ""  # "repetition 1 of 2" for repeated layers, for messages
    body: Optional[List["Entry"]] = None  # a residual block's layers
    shortcut: Optional[List["Entry"]] = None  # its explicit shortcut ([] = identity), None = chosen by shape


def expand(specs: List[LayerSpec], key: str, prefix: str, problems: List[Problem], repetition: str = "") -> List[Entry]:
    """The layers of ``specs`` (the list at config ``key``) with every repeat expanded, named below ``prefix``."""
    entries: List[Entry] = []
    for i, spec in enumerate(specs):
        here, name = f"{key}[{i}]", prefix + (spec.name or f"{spec.type}_{i}")
        if isinstance(spec, Repeat):
            for missing in (k for k in spec.overrides if k >= spec.times):
                problems.append(Problem(f"{here}.overrides[{missing}]", f"there is no repetition {missing}: times "
                                        f"is {spec.times} (repetitions 0–{spec.times - 1})"))
            for k in range(spec.times):
                unit, unit_key = _repetition(spec, k, here, problems)
                entries += expand(unit, unit_key, f"{name}_{k}/", problems, f"repetition {k} of {spec.times}")
            continue
        entry = Entry(spec, name, here, repetition)
        if isinstance(spec, Residual):
            entry.body = expand(spec.layers, f"{here}.layers", f"{name}/", problems, repetition)
            if spec.shortcut is not None:
                entry.shortcut = expand(spec.shortcut, f"{here}.shortcut", f"{name}/shortcut/", problems, repetition)
        entries.append(entry)
    names = [s.name for s in specs if s.name]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem(key, f"layer name '{dup}' is used more than once"))
    return entries


def _repetition(spec: Repeat, k: int, here: str, problems: List[Problem]):
    """Repetition ``k``'s layers and their config key: the repeat's own, or a copy with its overrides applied."""
    if k not in spec.overrides:
        return spec.layers, f"{here}.layers"
    key = f"{here}.overrides[{k}]"
    written = [layer.model_dump(exclude_unset=True) for layer in spec.layers]
    found: List[Problem] = []
    changed = patch.apply(written, spec.overrides[k], key, found)
    if not found:
        try:
            return _LAYER_LIST.validate_python(changed), key
        except ValidationError as err:
            found = problems_from(err, key, Repeat, SPEC_TYPES)
    problems.extend(found)
    return [], key
