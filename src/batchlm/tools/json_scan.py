"""The top level of a JSON call object that may still be arriving: which keys have started, where their
values begin and (once closed) end. Values are delimited with the C JSON decoder, so rescanning the
whole text at every delta stays cheap; an unclosed value reads as still arriving, and callers treat
"still arriving" at the end of the output as malformed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def skip_whitespace(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    assert match is not None
    return match.end()


@dataclass(frozen=True)
class ValueSpan:
    start: int
    # Just past the value; None while it is still arriving.
    end: int | None


@dataclass(frozen=True)
class ObjectScan:
    fields: dict[str, ValueSpan]
    # Just past the closing brace; None while the object is still arriving (or malformed).
    end: int | None
    # Text that can never become a JSON object (a missing quote, colon or comma).
    malformed: bool = False


def value_end(text: str, start: int, final: bool) -> int | None:
    """End of the JSON value at `start`, or None while it may still grow. A number or literal counts as
    closed only once a delimiter follows it (or the output has ended)."""
    if start >= len(text):
        return None
    try:
        value, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if isinstance(value, dict | list | str) or final:
        return int(end)
    return int(end) if skip_whitespace(text, end) < len(text) else None


def scan_object(text: str, pos: int, final: bool) -> ObjectScan:
    """Scan the object whose '{' is at text[pos]."""
    fields: dict[str, ValueSpan] = {}
    pos = skip_whitespace(text, pos + 1)
    if text.startswith("}", pos):
        return ObjectScan(fields, pos + 1)
    while pos < len(text):
        if text[pos] != '"':
            return ObjectScan(fields, None, malformed=True)
        key_end = value_end(text, pos, final)
        if key_end is None:
            break
        key = json.loads(text[pos:key_end])
        pos = skip_whitespace(text, key_end)
        if pos >= len(text):
            break
        if text[pos] != ":":
            return ObjectScan(fields, None, malformed=True)
        start = skip_whitespace(text, pos + 1)
        end = value_end(text, start, final)
        fields[key] = ValueSpan(start, end)
        if end is None:
            break
        pos = skip_whitespace(text, end)
        if text.startswith("}", pos):
            return ObjectScan(fields, pos + 1)
        if text.startswith(",", pos):
            pos = skip_whitespace(text, pos + 1)
        elif pos < len(text):
            return ObjectScan(fields, None, malformed=True)
    return ObjectScan(fields, None)
