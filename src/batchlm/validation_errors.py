"""Which of pydantic's validation errors to report, and the field it names as a client writes it
(`messages[0].content`): one rule for the HTTP API's 400s and for what LLM.chat refuses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

# Pydantic names the union member that failed inside `loc` (e.g. "str", "list[int]"); clients never see them.
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


# The input a `loc` is read against when the caller has none: every tag-like part is taken as a tag.
UNKNOWN: Any = object()


def _is_union_tag(part: Any, models: set[str], value: Any = UNKNOWN) -> bool:
    """A member's name in a union error's `loc`: a type ("str", "list[str]", "literal['a']") or a model's
    class name ("NamedToolChoice"). `value` is the input at that point of the `loc`: a key of it is the
    client's own (a `logit_bias` or `metadata` key "a[0]"), which pydantic names as it is."""
    if not isinstance(part, str) or (isinstance(value, dict) and part in value):
        return False
    return part in _UNION_TAGS or "[" in part or part in models


def _union_tags(loc: Sequence[Any], data: Any, models: set[str]) -> list[bool]:
    """For each part of `loc`, whether it names a union member rather than a key or index of `data`
    (the input the `loc` points into; UNKNOWN where the caller has none or it stops following)."""
    tags, value = [], data
    for part in loc:
        tag = _is_union_tag(part, models, value)
        tags.append(tag)
        if not tag:  # a member's name reads the same value as that member
            value = _child(value, part)
    return tags


def _child(value: Any, part: Any) -> Any:
    """The item of `value` a `loc` part names (a key or an index), UNKNOWN where there is none."""
    if isinstance(value, dict):
        return value.get(part, UNKNOWN)
    if isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
        return value[part]
    return UNKNOWN


def _model_names(base: type[BaseModel]) -> set[str]:
    """The class names of every pydantic model (a union member's tag when it is a model)."""
    names = set()
    for model in base.__subclasses__():
        names.add(model.__name__)
        names |= _model_names(model)
    return names


def most_specific(errors: Sequence[Any], data: Any = UNKNOWN) -> dict[str, Any]:
    """The error to report. Pydantic reports a union's failure once for each member, the first member
    first: `"stop": [null]` fails as a string before it fails at stop[0] as a list of strings, and
    `"tool_choice": {"type": "allowed_tools", ...}` as one of the literal choices before it is found
    to lack its `allowed_tools.tools`. The member that read furthest into the value before its first
    error names what is wrong (`_progress`), one whose type the value had over one it did not
    (`[1.5]`: a token id with a fraction, not a string); its own name is dropped from the `loc`.
    `data`: the input validated, which tells a client's dict key from a member's name."""
    first: dict[str, Any] = errors[0]
    loc = tuple(first.get("loc", ()))
    tags = _union_tags(loc, data, _model_names(BaseModel))
    tag = next((i for i, is_tag in enumerate(tags) if is_tag), None)
    if tag is None:
        return first
    # Each member's first error: where reading the value as that member stopped.
    members: dict[Any, dict[str, Any]] = {}
    for error in errors:
        error_loc = tuple(error.get("loc", ()))
        if len(error_loc) > tag and error_loc[:tag] == loc[:tag]:
            members.setdefault(error_loc[tag], error)
    deepest = max(members.values(), key=_progress)
    deep_loc = tuple(deepest["loc"])
    return {**deepest, "loc": deep_loc[:tag] + deep_loc[tag + 1 :]}


def _progress(error: dict[str, Any]) -> tuple[int, tuple[int, ...], bool]:
    """How far a union member read into the value before it failed: deeper, then at a later item
    (`["a", 1]` read as strings fails at [1], as token ids at [0]), then a value of the member's type
    over one of another."""
    loc = tuple(error.get("loc", ()))
    items = tuple(part if isinstance(part, int) else 0 for part in loc)
    return len(loc), items, not error.get("type", "").endswith("_type")


def param_from_loc(loc: Sequence[Any], data: Any = UNKNOWN) -> str | None:
    """("body", "messages", 0, "content", "str") -> "messages[0].content"; ("query", "limit") -> "limit".
    `data`: the input `loc` points into (as most_specific takes it), so that a dict key of the client's
    that looks like a member's name is kept."""
    param = ""
    tags = _union_tags(loc, data, _UNION_TAGS)
    if loc and loc[0] in ("query", "path"):  # a URL's parameter is named as the client wrote it
        loc, tags = loc[1:], tags[1:]
    for part, tag in zip(loc, tags, strict=True):
        if isinstance(part, int):
            param += f"[{part}]"
        elif not (part == "body" or tag):
            param += f".{part}" if param else str(part)
    return param or None
