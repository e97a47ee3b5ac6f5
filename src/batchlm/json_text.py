"""JSON text from a client that pydantic does not read (a schema sent as a string, a tool call's
arguments, a line of a batch file): Python's reader raises RecursionError, not ValueError, for arrays
or objects nested past the interpreter's recursion limit, which an `except ValueError` around it
misses (a 500 for a client's mistake). Nesting is bounded as deep as a request body itself may nest,
so that what such text holds is as safe to serialize and render (json.dumps, a chat template) as the
body's own objects."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core

# pydantic's JSON reader (the fast path's request bodies) refuses nesting past 200 levels: a value
# (an empty array or object being one) inside more than 200 arrays or objects. Every JSON route
# refuses such a body (body_too_deep).
MAX_DEPTH = 200


class NestingTooDeep(ValueError):
    """JSON text nested past MAX_DEPTH."""


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, with nesting deeper than max_depth a ValueError (NestingTooDeep) like any other
    unreadable text. max_depth: more than MAX_DEPTH only for text that wraps a request body (a batch
    line's object around its `body`)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
    else:
        # Fewer brackets than the bound cannot nest past it: most texts are not walked.
        if text.count("[") + text.count("{") <= max_depth or _depth(value) <= max_depth:
            return value
    raise NestingTooDeep(f"its arrays or objects nest more than {max_depth} levels deep")


def body_too_deep(body: bytes) -> bool:
    """Whether a request body nests past MAX_DEPTH; False for one that is not JSON at all (its reader
    says why). Python's reader (FastAPI's) takes bodies about 1000 levels deep, which pydantic's would
    refuse: each JSON route asks here, so that every route and a batch file's line take the same."""
    # Fewer brackets than the bound cannot nest past it: most bodies are not parsed here.
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False
    try:
        pydantic_core.from_json(body)
        return False
    except ValueError as error:
        if "recursion limit" in str(error):
            return True
    # Text pydantic's reader refuses for something else (a lone surrogate) may still be read by Python's.
    try:
        return _depth(json.loads(body)) > MAX_DEPTH
    except RecursionError:
        return True
    except ValueError:
        return False


def _depth(value: Any) -> int:
    """How many lists and dicts nest around `value`'s innermost values (an empty list or dict being
    one, as pydantic's reader counts), walked without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth if children else depth - 1)
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
