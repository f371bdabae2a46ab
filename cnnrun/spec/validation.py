"""Turn pydantic's validation errors into cnnrun's one-line problems: dotted key, what is wrong, what is allowed."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple, Type

from pydantic import BaseModel, ValidationError

from cnnrun.errors import Problem, did_you_mean, one_of


def dotted_key(prefix: str, loc: Sequence[Any], tags: Iterable[str] = ()) -> str:
    """('layers', 3, 'conv2d', 'padding') → 'model.layers[3].padding' (the union tag is not a key)."""
    tags = set(tags)
    key = prefix
    previous_was_index = False
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
            previous_was_index = True
            continue
        if previous_was_index and part in tags:
            previous_was_index = False
            continue
        key = f"{key}.{part}" if key else str(part)
        previous_was_index = False
    return key


def _model_for(loc: Sequence[Any], root: Type[BaseModel], tagged: Dict[str, Type[BaseModel]]) -> Type[BaseModel]:
    """The pydantic class that owns the last key of ``loc``: walk down from the root through union tags and
    fields that are models themselves (('trainer', 'epoch') is owned by the trainer group's class)."""
    owner = root
    for part in loc[:-1]:
        if isinstance(part, str) and part in tagged:
            owner = tagged[part]
            continue
        field = owner.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            owner = annotation
    return owner


def problems_from(
    error: ValidationError,
    prefix: str,
    root: Type[BaseModel],
    tagged: Dict[str, Type[BaseModel]] | None = None,
) -> List[Problem]:
    """Reshape every pydantic error into a :class:`Problem` under ``prefix``."""
    tagged = tagged or {}
    problems: List[Problem] = []
    for err in error.errors(include_url=False):
        loc: Tuple[Any, ...] = tuple(err["loc"])
        kind = err["type"]
        received = err.get("input")
        ctx = err.get("ctx", {})
        if kind == "union_tag_invalid":
            tag = ctx.get("tag")
            text = f"unknown layer type '{tag}'{did_you_mean(tag, tagged)}; allowed: {one_of(tagged)}"
            problems.append(Problem(dotted_key(prefix, loc, tagged) + ".type", text))
            continue
        if kind == "union_tag_not_found":
            problems.append(Problem(dotted_key(prefix, loc, tagged), f"a layer needs a 'type': {one_of(tagged)}"))
            continue
        key = dotted_key(prefix, loc, tagged)
        if kind == "extra_forbidden":
            owner = _model_for(loc, root, tagged)
            allowed = [f for f in owner.model_fields if f != "type"]
            word = loc[-1]
            text = f"unknown key '{word}'{did_you_mean(word, allowed)}; allowed keys: {', '.join(allowed)}"
        elif kind == "missing":
            owner = _model_for(loc, root, tagged)
            field = owner.model_fields.get(str(loc[-1]))
            hint = f" ({field.description})" if field is not None and field.description else ""
            text = f"required key is missing{hint}"
        elif kind == "value_error":
            text = err["msg"].removeprefix("Value error, ")
        elif kind in ("int_parsing", "int_type", "int_from_float"):
            text = f"expected an integer; received {received!r}"
        elif kind in ("float_parsing", "float_type"):
            text = f"expected a number; received {received!r}"
        elif kind in ("bool_parsing", "bool_type"):
            text = f"expected true or false; received {received!r}"
        elif kind in ("string_type",):
            text = f"expected a string; received {received!r}"
        elif kind == "literal_error":
            text = f"expected {ctx.get('expected')}; received {received!r}"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            text = f"{err['msg'].lower()}; received {received!r}"
        elif kind in ("list_type", "too_short"):
            text = f"{err['msg'].lower()}; received {received!r}"
        else:
            text = f"{err['msg']}; received {received!r}"
        problems.append(Problem(key, text))
    return problems
