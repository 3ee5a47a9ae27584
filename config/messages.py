"""Pydantic's validation errors in the product's words: the message for each kind of error
(allowed values, patterns in plain terms, "did you mean" for a misspelt key), the key path
without the tags pydantic adds for union members, and the models along a key path."""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from config.base import PROBLEM_TYPE, KeyPath
from config.words import did_you_mean, listing, pattern_words


def key_path(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    """The error's location as a key path of the file: pydantic adds the tags of union members
    (`simulated`, `literal['rms',...]`, `constrained-str`), which are not keys."""
    path: list[str | int] = []
    current: Any = data
    for number, part in enumerate(loc):
        last = number == len(loc) - 1
        inside = (isinstance(current, dict) and part in current) or (
            isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        )
        if inside:
            current = current[part]
        elif isinstance(part, str) and not (last and isinstance(current, dict)):
            continue  # a union member's tag
        else:
            current = None  # a missing key, or a missing position of a tuple
        path.append(part)
    return tuple(path)


def message_for(error: ErrorDetails, path: KeyPath, root: type[BaseModel], data: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    shown = (
        f", not {value!r}" if isinstance(value, str | int | float) and len(repr(value)) < 80 else ""
    )
    if kind == PROBLEM_TYPE:
        return str(ctx.get("message", error["msg"]))
    if kind in ("value_error", "assertion_error"):
        return error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "extra_forbidden":
        fields = _fields_at(root, path[:-1], data)
        hint = did_you_mean(path[-1], fields)
        if hint or not fields:
            return f"unknown key {path[-1]!r}{hint}"
        return f"unknown key {path[-1]!r}; the keys here are {listing(sorted(fields), last='and')}"
    if kind == "missing":
        return f"required key is missing ({_describe(root, path, data)})".replace(" ()", "")
    if kind == "literal_error":
        allowed = _quoted(str(ctx.get("expected", "")))
        return f"must be one of {listing(allowed)}{shown}{did_you_mean(value, allowed)}"
    if kind == "union_tag_invalid":
        allowed = _quoted(str(ctx.get("expected_tags", "")))
        tag = ctx.get("tag")
        return (
            f"unknown type {tag!r}{did_you_mean(tag, allowed)}: type is one of {listing(allowed)}"
        )
    if kind == "union_tag_not_found":
        return "`type` is missing: it says which kind this is (see docs/configuration.md)"
    if kind == "string_pattern_mismatch":
        return f"must be {pattern_words(str(ctx.get('pattern', '')))}{shown}"
    if kind == "string_too_short":
        least = int(ctx.get("min_length", 1))
        return "must not be empty" if least == 1 else f"must be at least {least} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind in ("too_short", "too_long") and ctx.get("field_type") == "Tuple":
        size = ctx.get("min_length", ctx.get("max_length"))
        return f"must be a list of {size} values, not {ctx.get('actual_length')}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), has {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"holds at most {ctx.get('max_length')} item(s), has {ctx.get('actual_length')}"
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}{shown}"
    plain = {
        "int_parsing": "must be an integer (a whole number)",
        "int_type": "must be an integer (a whole number)",
        "int_from_float": "must be an integer (a whole number)",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be text (put it in quotes)",
        "list_type": "must be a list (`- item` lines, or [a, b])",
        "tuple_type": "must be a list (e.g. [low, high])",
        "dict_type": "must be a mapping of `key: value` lines",
        "model_type": "must be a section of `key: value` lines",
        "model_attributes_type": "must be a section of `key: value` lines",
        "path_type": "must be a file path",
    }
    if kind in plain:
        return plain[kind] + shown
    return error["msg"].replace("Input should be", "must be")


def _quoted(text: str) -> list[str]:
    """`'a', 'b' or 'c'` (pydantic's list of allowed values) -> [a, b, c]."""
    return re.findall(r"'([^']*)'", text)


# ----------------------------------------------------------- the models along a key path


def _unwrap(annotation: Any, value: Any) -> Any:
    """The model (or container type) an annotation means for this value: Annotated and
    Optional removed, a discriminated union's member picked by the value's `type`."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            kind = value.get("type") if isinstance(value, dict) else None
            picked = [m for m in models if kind in get_args(_type_field(m))]
            if picked:
                annotation = picked[0]
            elif len(members) == 1:
                annotation = members[0]
            else:
                return None
        else:
            return annotation


def _type_field(model: type[BaseModel]) -> Any:
    info = model.model_fields.get("type")
    return info.annotation if info is not None else None


def model_at(root: type[BaseModel], path: KeyPath, data: Any) -> Any:
    annotation: Any = root
    value = data
    for part in path:
        annotation = _unwrap(annotation, value)
        origin = get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return None
            annotation = info.annotation
        elif origin in (list, tuple, dict):
            args = get_args(annotation)
            if origin is tuple and isinstance(part, int) and part < len(args):
                annotation = args[part]
            elif args:
                annotation = args[-1]
        else:
            return None
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            value = None
    return _unwrap(annotation, value)


def _fields_at(root: type[BaseModel], path: KeyPath, data: Any) -> list[str]:
    model = model_at(root, path, data)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _describe(root: type[BaseModel], path: KeyPath, data: Any) -> str:
    """The first sentence of the field's description."""
    model = model_at(root, path[:-1], data)
    if isinstance(model, type) and issubclass(model, BaseModel):
        info = model.model_fields.get(str(path[-1]))
        if info is not None and info.description:
            return info.description.split(". ")[0].rstrip(".")
    return ""


__all__ = ["key_path", "message_for", "model_at"]
