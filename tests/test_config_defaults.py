"""One source of truth for defaults: the pydantic models (cnnrun.config, the backends' options classes).

Hydra only accepts ``group.key=value`` for a key its YAML lists, so the YAML that a run composes by default (the
default choice of each group, every framework's file, the primary config's own blocks) names every key; this
test holds each such value to the pydantic default, so the two cannot drift apart. Other choices (trainer=quick,
optimizer=sgd, …) exist to change values and are not held to it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import pytest
import yaml
from pydantic import BaseModel

from cnnrun.backends import BACKENDS
from cnnrun.config import RunConfig
from tests.helpers import CONF

PRIMARY = yaml.safe_load((CONF / "config.yaml").read_text())
DEFAULT_CHOICES = {group: choice for entry in PRIMARY["defaults"] if isinstance(entry, dict)
                   for group, choice in entry.items() if choice is not None and "/" not in group
                   and not group.startswith("override")}


def _defaults(model) -> Dict[str, Any]:
    """Field → its default, for the fields that have one (nested models as dicts)."""
    out = {}
    for name, field in model.model_fields.items():
        if field.is_required():
            continue
        value = field.get_default(call_default_factory=True)
        out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out


def _restated(where: str, data: Dict[str, Any], model) -> Iterator[Tuple[str, Any, Any]]:
    defaults = _defaults(model)
    for key, value in data.items():
        if key == "defaults" or key not in defaults:
            continue
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            yield from _restated(f"{where}.{key}", value, annotation)
            continue
        expected = defaults[key]
        if isinstance(expected, tuple):
            expected = list(expected)
        if value != expected:
            yield f"{where}.{key}", value, expected


def _cases():
    for group, choice in DEFAULT_CHOICES.items():
        field = RunConfig.model_fields.get(group)
        if field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                and group != "framework":
            yield pytest.param(f"conf/{group}/{choice}.yaml", group, field.annotation, id=f"{group}={choice}")
    for name, info in BACKENDS.items():
        yield pytest.param(f"conf/framework/{name}.yaml", None, info.options, id=f"framework={name}")
    yield pytest.param("conf/config.yaml", None, RunConfig, id="config.yaml")


@pytest.mark.parametrize("path, group, model", list(_cases()))
def test_the_default_yaml_restates_the_pydantic_defaults_exactly(path, group, model):
    data = yaml.safe_load((CONF.parent / path).read_text())
    if group == "dataset":  # a dataset's own values (download, splits) are its choice; its augment default is not
        (augment,) = [entry["augment"] for entry in data["defaults"] if isinstance(entry, dict)]
        data = {"augment": yaml.safe_load((CONF / "dataset" / "augment" / f"{augment}.yaml").read_text())}
    differ = [f"{key}: YAML {value!r}, pydantic {expected!r}" for key, value, expected in _restated(path, data, model)]
    assert not differ, "conf/ and cnnrun's pydantic models disagree on defaults:\n" + "\n".join(differ)
