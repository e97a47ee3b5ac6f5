"""The JSON prefix check against its token-by-token reading, over generated texts; a call object's scan
as it grows."""

from __future__ import annotations

import random

from batchlm.tools.json_scan import (
    JsonCursor,
    ObjectScan,
    _is_json_prefix_by_tokens,
    is_json_prefix,
    json_cursor,
    scan_object,
)

# Strings' hard parts (quotes, escapes, control characters, unicode, surrogates) and JSON's structure.
PIECES = ['"', "\\", "u", "0", "a", "F", "x", "\x01", "\n", " ", "{", "}", ":", ",", "[", "]", "n", "é"]
PIECES += ["\ud800", "t", "/", "b", "1", "-", ".", "e", "true", "nul", '"k": ', '{"a": "', '["']


def test_the_decoders_shortcuts_read_as_the_tokens_do() -> None:
    rng = random.Random(7)
    disagreements = []
    for _ in range(30_000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        if is_json_prefix(text, 0) != _is_json_prefix_by_tokens(text, 0):
            disagreements.append(text)
    assert disagreements == []


def test_a_line_break_inside_a_string_is_no_trailing_whitespace() -> None:
    assert not is_json_prefix('{"a": "x\n', 0) and not is_json_prefix('["0\r', 0)
    assert is_json_prefix('{"a": "x"\n', 0) and is_json_prefix('{"a": "x\\n', 0)


def test_a_long_string_cut_off_anywhere_is_a_prefix_and_one_bad_character_is_not() -> None:
    value = '{"path": "a.py", "content": "' + 'x = \\"1\\"\\n\\u00e9 ' * 2_000
    assert all(is_json_prefix(value[:end], 0) for end in range(len(value) - 40, len(value) + 1))
    assert not is_json_prefix(value + "\x1f", 0)
    assert not is_json_prefix(value + "\\q", 0)
    assert is_json_prefix(value + "\\", 0) and is_json_prefix(value + "\\u0", 0)


NOT_PREFIXES = [
    '{"a": [1}', "[1}", '{"a": 1]', "]", '{"a" 1', "{1: 2}", "[1 2]", '{"a": 1,}', "[,1]", '{"a"}', "[1]]",
    '{"a": 1}}', "[:]", "{,}", "[1,]", '{"a": tru e}', "01", "--1", "1.e5.", '"a" "b"', "nulll", '{"a": "b": 1}',
    '[1, 2] x', "{]", "[}", '{"a": 1 "b": 2}', "[nul]", "-Inf]",
]  # fmt: skip
PREFIXES = [
    '{"a": [1', '{"a": [1, {"b": ', "[", "{", " ", '"ab\\', '{"a": -', '{"a": 1.', '{"a": 1e', '{"a": 1e+',
    "[tr", '{"a": "x"}  ', "[1, 2]\n", '{"a": {"b": [[], {}]}, "c', "-Inf", "[-0.5e-3", '{"\\u00e9": null',
]  # fmt: skip


def test_structure_that_no_text_can_complete_is_no_prefix() -> None:
    for text in NOT_PREFIXES:
        assert not is_json_prefix(text, 0) and json_cursor(text, 0) is None, text
    for text in PREFIXES:
        assert is_json_prefix(text, 0) and json_cursor(text, 0) is not None, text


def read_in_pieces(text: str, rng: random.Random) -> JsonCursor | None:
    cursor: JsonCursor | None = JsonCursor()
    pos = 0
    while pos < len(text) and cursor is not None:
        size = rng.choice([1, 1, 2, 3, 5])
        cursor = cursor.read(text[pos : pos + size])
        pos += size
    return cursor


def test_a_cursor_read_in_pieces_stands_where_one_read_at_once_does() -> None:
    rng = random.Random(9)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14))) for _ in range(20_000)]
    texts += NOT_PREFIXES + PREFIXES
    for text in texts:
        assert read_in_pieces(text, rng) == json_cursor(text, 0), text


# A call object's top-level fields: numbers cut anywhere (before a fraction or an exponent among them),
# literals, strings, and what breaks the object.
OBJECT_PIECES = ['"k": ', '"k": 1', '"k": -2', ".", "5", "0", "e", "E+", "-", ", ", "}", " ", "true"]
OBJECT_PIECES += ['"s"', "x", ":", '"a\\', "[1.", "{"]


def test_an_object_read_malformed_or_closed_stays_so_as_it_grows() -> None:
    """What a stream that reads on from an output's end relies on: once a scan reads an object as never
    JSON or as closed, every longer text reads the same. A number the text cuts before its fraction
    or exponent ("1.", "1e", "-2.5E+") is still arriving, not a number followed by a stray character."""
    rng = random.Random(13)
    for _ in range(3_000):
        text = "{" + "".join(rng.choice(OBJECT_PIECES) for _ in range(rng.randint(1, 12)))
        settled: tuple[str, ObjectScan] | None = None  # the text it settled at, and its scan
        for end in range(1, len(text) + 1):
            scan = scan_object(text[:end], 0, final=False)
            if settled is not None:
                assert scan == settled[1], (settled[0], text[:end])
            elif scan.malformed or scan.end is not None:
                settled = (text[:end], scan)
