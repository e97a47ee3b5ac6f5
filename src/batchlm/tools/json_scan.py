"""The top level of a JSON call object that may still be arriving: which keys have started, where their
values begin and (once closed) end. Values are delimited with the C JSON decoder, so rescanning the
whole text stays cheap; an unclosed value reads as still arriving, and callers treat
"still arriving" at the end of the output as malformed. Text that no continuation can make JSON is
malformed at once (`is_json_prefix`), so that a stream stops reading it as a call's arguments."""

from __future__ import annotations

import enum
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
    # Still arriving, and the text ends inside one of its strings: the escape it ends part way through
    # ("" for none; `continue_string`); None otherwise.
    string_tail: str | None = None


def value_end(text: str, start: int, final: bool) -> int | None:
    """End of the JSON value at `start`, or None while it may still grow. A number or literal counts as
    closed only once a delimiter follows it (or the output has ended)."""
    if start >= len(text):
        return None
    try:
        value, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    except RecursionError:
        # Nested deeper than Python's reader goes (a model can write "[" a thousand times): never
        # read as a value, as one that never closes; the output keeps it as text.
        return None
    if isinstance(value, dict | list | str) or final:
        return int(end)
    return int(end) if skip_whitespace(text, end) < len(text) else None


def scan_object(text: str, pos: int, final: bool) -> ObjectScan:
    """Scan the object whose '{' is at text[pos]."""
    scan = _scan_object(text, pos, final)
    if scan.end is None and not scan.malformed:
        prefix = read_prefix(text, pos)
        if prefix is Prefix.NONE:
            return ObjectScan(scan.fields, None, malformed=True)
        return ObjectScan(scan.fields, None, string_tail=string_tail(prefix))
    return scan


def _scan_object(text: str, pos: int, final: bool) -> ObjectScan:
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
        # A key given twice keeps its first value: the one a stream has announced or sent by then.
        fields.setdefault(key, ValueSpan(start, end))
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


# A string's characters as JSON takes them (strict: no control characters) and whole escapes; and
# one escape cut off part way at the end of the text.
_STRING_CHARS = r'(?:[^"\\\x00-\x1f]++|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*+'
_OPEN_ESCAPE = r"\\(?:u[0-9a-fA-F]{0,3})?"
# One JSON token after optional whitespace. A number must not be followed by what could extend it, so
# that "1." at the end of the text reads as a partial number rather than "1" and a stray ".".
_TOKEN = re.compile(
    r"""[ \t\n\r]*(?:
        (?P<string>"""
    + f'"{_STRING_CHARS}"'
    + r""")
        |(?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9.eE+-]))
        |(?P<literal>true|false|null|NaN|Infinity|-Infinity)
        |(?P<punct>[{}\[\]:,])
    )""",
    re.VERBOSE,
)
# The end of the text may cut a string, number or literal off part way.
_PARTIAL_STRING = re.compile(f'"{_STRING_CHARS}(?:{_OPEN_ESCAPE})?')
_PARTIAL_NUMBER = re.compile(r"-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?")
# json.loads takes NaN and the infinities too.
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")

# What the next token may be.
_VALUE, _FIRST_ITEM, _FIRST_KEY, _KEY, _COLON, _AFTER_VALUE, _DONE = range(7)


class Prefix(enum.Enum):
    """What a text is of a JSON value: nothing it can become, a prefix, or a prefix that ends inside a
    string: outside any escape (IN_STRING), or just after the backslash that opens one (IN_ESCAPE)."""

    NONE = enum.auto()
    PREFIX = enum.auto()
    IN_STRING = enum.auto()
    IN_ESCAPE = enum.auto()


def string_tail(prefix: Prefix) -> str | None:
    """The escape a prefix ending inside a string ends part way through ("" for none); None for a
    prefix that does not end inside a string."""
    return {Prefix.IN_STRING: "", Prefix.IN_ESCAPE: "\\"}.get(prefix)


# Text that continues a string: characters a string takes as they are and whole escapes, then maybe
# one escape cut off part way (its text so far: group 1).
_STRING_RUN = re.compile(f"{_STRING_CHARS}({_OPEN_ESCAPE})?")


def continue_string(tail: str, delta: str) -> str | None:
    """After text that ends inside a string, part way through the escape `tail` ("" for none): the
    escape `delta` leaves the string part way through ("" for none), or None where `delta` does not
    only continue the string (a quote, a control character, a bad escape)."""
    match = _STRING_RUN.fullmatch(tail + delta)
    return None if match is None else match.group(1) or ""


def is_json_prefix(text: str, start: int) -> bool:
    """Whether text[start:] can still become one JSON value as more text arrives (a complete value
    counts, with nothing but whitespace after it). Strict, as json.loads is: no control characters in
    strings."""
    return read_prefix(text, start) is not Prefix.NONE


def read_prefix(text: str, start: int) -> Prefix:
    """What text[start:] is of a JSON value (`is_json_prefix`, and whether it ends inside a string)."""
    # The C decoder settles the usual cases: it read everything and wanted more, or stopped inside a
    # string that runs to the end. What it stopped at otherwise (a number or literal cut off part way,
    # or an error) is read token by token.
    try:
        _, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as error:
        # Out of text where a value, key or delimiter was wanted; a line break inside a string is no
        # whitespace to skip but a control character there.
        if skip_whitespace(text, error.pos) == len(text) and not error.msg.startswith("Invalid control"):
            return Prefix.PREFIX
        if error.msg.startswith("Unterminated string"):
            # The decoder read that string to the end of the text and took every character and escape
            # in it (a control character or a bad escape is an error of its own), so what is left is
            # a string cut off part way: checking it again would cost the whole text at every delta.
            # An odd run of backslashes at the end opens an escape.
            backslashes = len(text) - len(text.rstrip("\\"))
            return Prefix.IN_ESCAPE if backslashes % 2 else Prefix.IN_STRING
    except RecursionError:
        # Nested past Python's reader, which value_end never reads as closed: reading the tokens
        # instead would cost the whole text again at every delta.
        return Prefix.PREFIX
    else:
        if skip_whitespace(text, end) == len(text):
            return Prefix.PREFIX
    return Prefix.PREFIX if _is_json_prefix_by_tokens(text, start) else Prefix.NONE


def _is_json_prefix_by_tokens(text: str, start: int) -> bool:
    open_containers: list[str] = []
    expect = _VALUE
    pos = start
    while (match := _TOKEN.match(text, pos)) is not None:
        pos, kind = match.end(), match.lastgroup
        assert kind is not None
        token = match.group(kind)
        if expect == _COLON:
            if token != ":":
                return False
            expect = _VALUE
            continue
        if expect in (_FIRST_KEY, _KEY) and kind == "string":
            expect = _COLON
            continue
        closes = {"}": "{", "]": "["}.get(token)
        if closes is not None and expect in (_FIRST_KEY, _FIRST_ITEM, _AFTER_VALUE):
            if not open_containers or open_containers.pop() != closes:
                return False
        elif expect == _AFTER_VALUE and token == ",":
            expect = _KEY if open_containers[-1] == "{" else _VALUE
            continue
        elif expect in (_VALUE, _FIRST_ITEM) and token in ("{", "["):
            open_containers.append(token)
            expect = _FIRST_KEY if token == "{" else _FIRST_ITEM
            continue
        elif not (expect in (_VALUE, _FIRST_ITEM) and kind != "punct"):
            return False
        expect = _AFTER_VALUE if open_containers else _DONE
    rest = text[skip_whitespace(text, pos) :]
    if not rest:
        return True
    if expect in (_FIRST_KEY, _KEY):
        return _PARTIAL_STRING.fullmatch(rest) is not None
    if expect in (_VALUE, _FIRST_ITEM):
        return (
            _PARTIAL_STRING.fullmatch(rest) is not None
            or _PARTIAL_NUMBER.fullmatch(rest) is not None
            or any(literal.startswith(rest) for literal in _LITERALS)
        )
    return False
