"""Config problems in relay's words: pydantic's errors, rephrased for an operator.

Pure. Every message names the path of the offending key; none quotes the value given
there, which may be a secret (a token YAML read as a number, say).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel


def _kind_of(value: Any) -> str:
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _quote_hint(value: Any) -> str:
    if isinstance(value, date):
        return ': YAML read the value as a date; put it in quotes (key: "...") to keep it as text'
    if isinstance(value, bool | int | float):
        # YAML reads `token: 0123` as the number 83, `on` as true: quoting keeps the text.
        return (
            ": YAML read the value as a number or true/false; put it in quotes"
            ' (key: "...") to keep it exactly as written'
        )
    return ""


_MAPPING = "a mapping (indented `key: value` lines)"
# What a value of the wrong type should have been, by pydantic's error type.
_EXPECTED = {
    "model_type": _MAPPING,
    "model_attributes_type": _MAPPING,
    "dict_type": _MAPPING,
    "list_type": "a list (`[a, b]` or `- item` lines)",
    "string_type": "text",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def describe(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One line, `path: what is wrong`, for one pydantic error."""
    loc = [str(part) for part in error["loc"]]
    kind, given, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    path = ".".join(loc) or "(top level)"
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_suggestion(root, error['loc'])}"
    if kind == "missing":
        return f"{path}: required"
    if kind == "int_from_float":
        return f"{path}: expected a whole number, got a fraction"
    if kind in _EXPECTED:
        hint = _quote_hint(given) if kind == "string_type" else ""
        return f"{path}: expected {_EXPECTED[kind]}, got {_kind_of(given)}{hint}"
    bound = {
        "greater_than_equal": ("at least", "ge"),
        "greater_than": ("more than", "gt"),
        "less_than_equal": ("at most", "le"),
        "less_than": ("less than", "lt"),
    }.get(kind)
    if bound is not None:
        return f"{path}: must be {bound[0]} {ctx.get(bound[1])}"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return f"{path}: needs at least {least} item{'s' if least != 1 else ''}"
    if kind == "string_too_short":
        return f"{path}: must not be empty"
    if kind == "literal_error":
        return f"{path}: expected one of {ctx.get('expected', '')}"
    if kind in ("ip_any_network", "ip_v4_network", "ip_v6_network"):
        return f"{path}: expected an address or a range, such as 10.0.0.0/8 or 2001:db8::/32"
    if kind in ("value_error", "assertion_error"):
        # relay's own validators: already in relay's words.
        return f"{path}: {str(error['msg']).removeprefix('Value error, ')}"
    return f"{path}: {error['msg']}"


def _suggestion(root: type[BaseModel], loc: Sequence[Any]) -> str:
    keys = keys_at(root, loc[:-1])
    if not keys:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.75)
    if close:
        return f" (did you mean {close[0]!r}?)"
    # A short list helps; the twenty keys of `server` would bury the line.
    return f" (expected one of: {', '.join(keys)})" if len(keys) <= 8 else ""


def keys_at(root: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The keys a config may hold at `loc`, or [] where that is not a fixed set (the
    names of sources and sinks). A discriminated union's tag in `loc` picks its member,
    as pydantic's own locations do."""
    annotation: Any = root
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _model(annotation)
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> tuple[Any, ...]:
    annotation = _strip(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(_strip(a) for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _model(annotation: Any) -> type[BaseModel] | None:
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


def _step(annotation: Any, part: Any) -> Any:
    members = _members(annotation)
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(models) > 1:
        # A discriminated union: the part is the tag that chose the member.
        for model in models:
            for tag in ("kind", "backend"):
                field = model.model_fields.get(tag)
                if field is not None and part in get_args(_strip(field.annotation)):
                    return model
        return None
    if len(models) == 1:
        model = models[0]
        for name, field in model.model_fields.items():
            if part in (name, field.alias):
                return field.annotation
        return None
    for member in members:
        origin = get_origin(member)
        if origin in (list, tuple) and isinstance(part, int | str):
            return get_args(member)[0]
        if origin is dict:
            return get_args(member)[1]
    return None
