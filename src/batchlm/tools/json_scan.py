"""The top level of a JSON call object that may still be arriving: which keys have started, where their
values begin and (once closed) end. Values are delimited with the C JSON decoder, so rescanning the
whole text stays cheap; an unclosed value reads as still arriving, and callers treat
"still arriving" at the end of the output as malformed. Text that no continuation can make JSON is
malformed at once (`is_json_prefix`), so that a stream stops reading it as a call's arguments.

A value still arriving can also be read on from where its text ends (`JsonCursor`): a stream then
reads each delta alone instead of the whole output again."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_DECODER = json.JSONDecoder()
# The same reading for JSON holding an integer longer than Python converts (4,300 digits): where a
# value ends is all a scan wants of it, and a model may write such a number.
_LONG_INTEGERS = json.JSONDecoder(parse_int=lambda digits: 0)
# What may follow the decoder's reading of a number and still belong to it ("1." before "1.5").
_NUMBER_GOES_ON = frozenset("0123456789.eE+-")
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


def raw_decode(text: str, start: int) -> tuple[object, int]:
    """json's raw_decode of the value at `start`, integers of any length taken (as placeholders)."""
    try:
        return _DECODER.raw_decode(text, start)  # type: ignore[no-any-return]
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer past Python's conversion limit
        return _LONG_INTEGERS.raw_decode(text, start)  # type: ignore[no-any-return]


def value_end(text: str, start: int, final: bool) -> int | None:
    """End of the JSON value at `start`, or None while it may still grow. A number or literal counts as
    closed only once a delimiter follows it (or the output has ended): the decoder reads "1." or "1e"
    as the number 1, which "1.5" or "1e3" goes on."""
    if start >= len(text):
        return None
    try:
        value, end = raw_decode(text, start)
    except ValueError:
        return None
    except RecursionError:
        # Nested deeper than Python's reader goes (a model can write "[" a thousand times): never
        # read as a value, as one that never closes; the output keeps it as text.
        return None
    if isinstance(value, dict | list | str) or final:
        return int(end)
    if skip_whitespace(text, end) == len(text) or text[end] in _NUMBER_GOES_ON:
        return None  # may still grow (or never be JSON: `is_json_prefix` tells)
    return int(end)


def scan_object(text: str, pos: int, final: bool) -> ObjectScan:
    """Scan the object whose '{' is at text[pos]."""
    scan = _scan_object(text, pos, final)
    if scan.end is None and not scan.malformed and not is_json_prefix(text, pos):
        return ObjectScan(scan.fields, None, malformed=True)
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
# The end of the text may cut a string (part way through an escape: group 1), number or literal off.
_PARTIAL_STRING = re.compile(f'"{_STRING_CHARS}({_OPEN_ESCAPE})?')
_PARTIAL_NUMBER = re.compile(r"-|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*|(?:\.[0-9]+)?[eE][+-]?[0-9]*)?")
# json.loads takes NaN and the infinities too.
_LITERALS = ("true", "false", "null", "NaN", "Infinity", "-Infinity")

# What the next token may be.
_VALUE, _FIRST_ITEM, _FIRST_KEY, _KEY, _COLON, _AFTER_VALUE, _DONE = range(7)


# Text that continues a string: characters a string takes as they are and whole escapes, then maybe
# one escape cut off part way (its text so far: group 1).
_STRING_RUN = re.compile(f"{_STRING_CHARS}({_OPEN_ESCAPE})?")


def is_json_prefix(text: str, start: int) -> bool:
    """Whether text[start:] can still become one JSON value as more text arrives (a complete value
    counts, with nothing but whitespace after it). Strict, as json.loads is: no control characters in
    strings."""
    # The C decoder settles the usual cases: it read everything and wanted more, or stopped inside a
    # string that runs to the end. What it stopped at otherwise (a number or literal cut off part way,
    # or an error) is read token by token.
    try:
        _, end = raw_decode(text, start)
    except json.JSONDecodeError as error:
        # Out of text where a value, key or delimiter was wanted; a line break inside a string is no
        # whitespace to skip but a control character there.
        if skip_whitespace(text, error.pos) == len(text) and not error.msg.startswith("Invalid control"):
            return True
        if error.msg.startswith("Unterminated string"):
            # The decoder read that string to the end of the text and took every character and escape
            # in it (a control character or a bad escape is an error of its own), so what is left is
            # a string cut off part way: checking it again would cost the whole text at every delta.
            return True
    except RecursionError:
        # Nested past Python's reader, which value_end never reads as closed: reading the tokens
        # instead would cost the whole text again at every delta.
        return True
    else:
        if skip_whitespace(text, end) == len(text):
            return True
    return _is_json_prefix_by_tokens(text, start)


@dataclass(frozen=True)
class JsonCursor:
    """Where the text of a JSON value that may still grow stands at its end: all that reading more of
    it needs (`read`), so that a delta is read alone, not with the text before it."""

    # The containers still open, outermost first: "{" or "[".
    containers: tuple[str, ...] = ()
    # What the next token may be; inside a string, what the string is (a key when _FIRST_KEY or _KEY).
    expect: int = _VALUE
    # A number or literal cut off at the end of the text ("" for none): read again with what follows.
    pending: str = ""
    # Inside a string: the escape the text ends part way through ("" for none). None outside strings.
    string_tail: str | None = None

    @property
    def open(self) -> bool:
        """Whether the value has not ended: one of its containers, or the string it is, is still open."""
        return bool(self.containers) or self.string_tail is not None

    def read(self, delta: str) -> JsonCursor | None:
        """The cursor once `delta` has followed; None where the text can no longer become JSON."""
        if self.string_tail is None:
            return _read_tokens(self.pending + delta, 0, list(self.containers), self.expect)
        run = _STRING_RUN.match(self.string_tail + delta)
        assert run is not None  # every part of the pattern may match nothing
        pos = run.end() - len(self.string_tail)
        if pos == len(delta):  # the string goes on (built directly: replace() costs more than the read)
            return JsonCursor(self.containers, self.expect, string_tail=run.group(1) or "")
        if pos < 0 or run.group(1) or delta[pos] != '"':
            return None  # a control character, or a bad escape
        containers = list(self.containers)
        expect = _COLON if self.expect in (_FIRST_KEY, _KEY) else _after_value(containers)
        return _read_tokens(delta, pos + 1, containers, expect)


def json_cursor(text: str, start: int) -> JsonCursor | None:
    """The cursor at the end of text[start:], read as one JSON value; None where it cannot become one."""
    return _read_tokens(text, start, [], _VALUE)


def _after_value(containers: list[str]) -> int:
    return _AFTER_VALUE if containers else _DONE


def _is_json_prefix_by_tokens(text: str, start: int) -> bool:
    return json_cursor(text, start) is not None


def _read_tokens(text: str, pos: int, containers: list[str], expect: int) -> JsonCursor | None:
    """The cursor at the end of text[pos:], read token by token from the state (containers, expect)."""
    while (match := _TOKEN.match(text, pos)) is not None:
        kind = match.lastgroup
        assert kind is not None
        if kind == "number" and match.end() == len(text):
            break  # more digits may follow: read again with them (`pending`)
        pos, token = match.end(), match.group(kind)
        if expect == _COLON:
            if token != ":":
                return None
            expect = _VALUE
            continue
        if expect in (_FIRST_KEY, _KEY) and kind == "string":
            expect = _COLON
            continue
        closes = {"}": "{", "]": "["}.get(token)
        if closes is not None and expect in (_FIRST_KEY, _FIRST_ITEM, _AFTER_VALUE):
            if not containers or containers.pop() != closes:
                return None
        elif expect == _AFTER_VALUE and token == ",":
            expect = _KEY if containers[-1] == "{" else _VALUE
            continue
        elif expect in (_VALUE, _FIRST_ITEM) and token in ("{", "["):
            containers.append(token)
            expect = _FIRST_KEY if token == "{" else _FIRST_ITEM
            continue
        elif not (expect in (_VALUE, _FIRST_ITEM) and kind != "punct"):
            return None
        expect = _after_value(containers)
    rest = text[skip_whitespace(text, pos) :]
    if not rest:
        return JsonCursor(tuple(containers), expect)
    partial = _PARTIAL_STRING.fullmatch(rest)
    if expect in (_FIRST_KEY, _KEY, _VALUE, _FIRST_ITEM) and partial is not None:
        return JsonCursor(tuple(containers), expect, string_tail=partial.group(1) or "")
    if expect in (_VALUE, _FIRST_ITEM) and (
        _PARTIAL_NUMBER.fullmatch(rest) is not None or any(literal.startswith(rest) for literal in _LITERALS)
    ):
        return JsonCursor(tuple(containers), expect, pending=rest)
    return None
