"""A stream's scans carried forward from the last one (`Scan.continued`) against a scan of the whole
output at every delta: the same deltas, over generated calls whose arguments hold long strings, and
outputs (text, calls, broken markup) read on from their end: Qwen3-Coder's raw values (Seed-OSS's in
its own tags), and the JSON families' text after their calls."""

from __future__ import annotations

import json
import random

import pytest

from batchlm.tools.calls import StreamDelta
from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.scan import Scan
from batchlm.tools.seed_oss import SeedOssParser

# What a string argument is made of: plain text, escapes, unicode, and what breaks a string.
STRING_PIECES = ["def f(x):", "    ", "return x", "\\n", '\\"', "\\\\", "\\u00e9", "\\/", "é", "✓", "\\t"]
BREAKING = ['"', "\n", "\\q", "\\u12x", "}", "\x01"]


def arguments(rng: random.Random) -> str:
    value = "".join(rng.choice(STRING_PIECES) for _ in range(rng.randint(0, 40)))
    if rng.random() < 0.2:  # a string that stops being one, or closes early
        cut = rng.randint(0, len(value))
        value = value[:cut] + rng.choice(BREAKING) + value[cut:]
    fields = [f'"path": "a{rng.randint(0, 9)}.py"', f'"content": "{value}"']
    if rng.random() < 0.3:
        fields.append(f'"lines": [{rng.randint(0, 99)}, -1.5e3, true, null, {{"k": "v\\n"}}]')
    rng.shuffle(fields)
    return "{" + ", ".join(fields) + "}"


def output(parser: ToolParser, rng: random.Random) -> str:
    calls = [arguments(rng) for _ in range(rng.randint(1, 3))]
    before = rng.choice(["", "Sure. ", "Let me write it.\n"])
    if isinstance(parser, HermesParser):
        body = "\n".join(f'<tool_call>\n{{"name": "write", "arguments": {a}}}\n</tool_call>' for a in calls)
    elif isinstance(parser, Llama3JsonParser):
        before, body = "", "; ".join(f'{{"name": "write", "parameters": {a}}}' for a in calls)
    elif isinstance(parser, MistralParser):
        if rng.random() < 0.5:
            body = "".join(f"[TOOL_CALLS]write[ARGS]{a}" for a in calls)
        else:
            body = "[TOOL_CALLS]" + json.dumps([{"name": "write", "arguments": {}}])[:-3] + calls[0] + "}]"
    elif isinstance(parser, GraniteParser):
        body = "<|tool_call|>[" + ", ".join(f'{{"name": "write", "arguments": {a}}}' for a in calls) + "]"
    elif isinstance(parser, RequiredCallsParser):
        before, body = "", "[" + ", ".join(f'{{"name": "write", "parameters": {a}}}' for a in calls) + "]"
    elif isinstance(parser, NamedFunctionParser):
        before, body = "", calls[0]
    elif isinstance(parser, SeedOssParser):
        body = "<seed:tool_call>\n<function=write>\n<parameter=path>a.py</parameter>\n</function>\n</seed:tool_call>"
    else:
        body = (
            "<tool_call>\n<function=write>\n<parameter=path>\na.py\n</parameter>\n</function>\n</tool_call>"
        )
    text = before + body + rng.choice(["", " Done.", "\n"])
    end = rng.randint(len(text) // 2, len(text)) if rng.random() < 0.3 else len(text)
    return text[:end]


def chunks(text: str, rng: random.Random) -> list[str]:
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.choice([1, 1, 2, 3, 4, 7, 16])
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


def deltas(parser: ToolParser, pieces: list[str], cut_short: bool) -> list[StreamDelta]:
    parser.new_id = lambda: "call"  # type: ignore[method-assign]
    stream = parser.stream()
    return [stream.feed(piece) for piece in pieces] + [stream.finish(cut_short)]


def assert_carried_as_whole(
    parser: ToolParser, cases: list[tuple[str, bool, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case's stream (text, cut short, deltas) sends with scans carried forward (as `continued`
    is now) what it sends with the whole output scanned at every delta."""
    fast = [deltas(parser, pieces, cut_short) for _, cut_short, pieces in cases]
    monkeypatch.setattr(Scan, "continued", lambda scan, delta: None)
    whole = [deltas(parser, pieces, cut_short) for _, cut_short, pieces in cases]
    for (text, _, _), a, b in zip(cases, fast, whole, strict=True):
        assert a == b, text


PARSERS = [
    HermesParser(),
    HermesParser(max_calls=1),
    Llama3JsonParser(),
    MistralParser(),
    GraniteParser(),
    RequiredCallsParser(),
    NamedFunctionParser("write"),
    Qwen3CoderParser(),
    SeedOssParser(),
]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: f"{type(p).__name__}-{p.max_calls}")
def test_a_stream_carried_forward_sends_what_whole_scans_send(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(11)
    continued = Scan.continued
    carried = 0

    def counted(scan: Scan, delta: str) -> Scan | None:
        nonlocal carried
        result = continued(scan, delta)
        carried += result is not None
        return result

    cases = [(output(parser, rng), rng.random() < 0.3) for _ in range(150)]
    cases = [(text, cut_short, chunks(text, rng)) for text, cut_short in cases]
    monkeypatch.setattr(Scan, "continued", counted)
    assert_carried_as_whole(parser, cases, monkeypatch)
    # The JSON families carry most deltas inside a call's strings forward, Qwen3-Coder those inside its
    # values and text; a named function's object never.
    if isinstance(parser, NamedFunctionParser):
        assert carried == 0
    else:
        assert carried > (500 if isinstance(parser, Qwen3CoderParser) else 1000)


# The hard parts of a string, each split across deltas somewhere: escapes (a surrogate pair's halves
# among them), markup and JSON punctuation inside it, and what ends or breaks it.
HARD_PIECES = ["ab", " ", "\\n", '\\"', "\\\\", "\\u00e9", "\\ud83d", "\\ude00", "\\ud83d\\ude00", "é", "😀"]
HARD_PIECES += ["\\/", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", ";", "{", "}", "[", "]", ":"]
HARD_PIECES += ["<|tool_call|>"]
HARD_BREAKING = ['"', "\n", "\\q", "\\u12x", "\x01", "\\u", "\\"]


def hard_string(rng: random.Random) -> str:
    value = "".join(rng.choice(HARD_PIECES) for _ in range(rng.randint(0, 12)))
    if rng.random() < 0.15:
        cut = rng.randint(0, len(value))
        value = value[:cut] + rng.choice(HARD_BREAKING) + value[cut:]
    return f'"{value}"'


def hard_value(rng: random.Random, depth: int = 0) -> str:
    kind = rng.random()
    if kind < 0.5 or depth > 2:
        return hard_string(rng)
    if kind < 0.7:
        return "[" + ", ".join(hard_value(rng, depth + 1) for _ in range(rng.randint(0, 3))) + "]"
    if kind < 0.9:
        items = (f"{hard_string(rng)}: {hard_value(rng, depth + 1)}" for _ in range(rng.randint(0, 3)))
        return "{" + ", ".join(items) + "}"
    return rng.choice(["1", "-2.5e3", "true", "null"])


def hard_arguments(rng: random.Random) -> str:
    """An arguments object with long keys and values, or now and then one given as a JSON string."""
    value = "{" + ", ".join(f"{hard_string(rng)}: {hard_value(rng)}" for _ in range(rng.randint(0, 3))) + "}"
    return json.dumps(value) if rng.random() < 0.15 else value


def hard_call(rng: random.Random, keys: tuple[str, ...]) -> str:
    """A call object: its arguments under either key, given twice now and then, among other fields."""
    key = rng.choice(keys)
    fields = ['"name": "write"', f'"{key}": {hard_arguments(rng)}']
    if rng.random() < 0.2:
        fields.append(f'"{key}": {hard_arguments(rng)}')
    if rng.random() < 0.2:
        fields.append(f'"note": {hard_value(rng)}')
    rng.shuffle(fields)
    return "{" + ", ".join(fields) + "}"


def hard_output(parser: ToolParser, rng: random.Random) -> str:
    keys = ("arguments", "parameters")
    calls = range(rng.randint(1, 3))
    before = rng.choice(["", "Sure. ", "<think>x</think>\n"])
    if isinstance(parser, HermesParser):
        body = "\n".join(f"<tool_call>\n{hard_call(rng, keys)}\n</tool_call>" for _ in calls)
    elif isinstance(parser, Llama3JsonParser):
        before = rng.choice(["", "<|python_tag|>"])
        body = "; ".join(hard_call(rng, keys) for _ in calls)
    elif isinstance(parser, MistralParser):
        if rng.random() < 0.5:
            body = "".join(f"[TOOL_CALLS]write[ARGS]{hard_arguments(rng)}" for _ in calls)
        else:
            body = "[TOOL_CALLS][" + ", ".join(hard_call(rng, keys[:1]) for _ in calls) + "]"
    elif isinstance(parser, GraniteParser):
        body = "<|tool_call|>[" + ", ".join(hard_call(rng, keys) for _ in calls) + "]"
    else:
        before, body = "", "[" + ", ".join(hard_call(rng, keys) for _ in calls) + "]"
    text = before + body + rng.choice(["", " Done.", "\n", ' "x'])
    return text[: rng.randint(0, len(text))] if rng.random() < 0.3 else text


JSON_PARSERS = [
    HermesParser(),
    HermesParser(max_calls=1),
    Llama3JsonParser(),
    Llama3JsonParser(max_calls=1),
    MistralParser(),
    MistralParser(max_calls=1),
    GraniteParser(),
    GraniteParser(max_calls=1),
    RequiredCallsParser(),
    RequiredCallsParser(max_calls=1),
]


def small_chunks(text: str, rng: random.Random) -> list[str]:
    """Deltas of a few characters: every escape is split at every place somewhere."""
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.choice([1, 1, 2, 3, 5])
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


@pytest.mark.parametrize("parser", JSON_PARSERS, ids=lambda p: f"{type(p).__name__}-{p.max_calls}")
def test_escapes_keys_and_string_arguments_split_anywhere_send_what_whole_scans_send(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    cases = [(hard_output(parser, rng), rng.random() < 0.3) for _ in range(80)]
    cases = [(text, cut_short, small_chunks(text, rng)) for text, cut_short in cases]
    assert_carried_as_whole(parser, cases, monkeypatch)


# What may break a JSON value's structure anywhere: stray or mismatched punctuation, a word, a number or
# literal gone wrong.
STRUCTURE_BREAKING = [
    "}",
    "]",
    ",",
    ":",
    "x",
    "1.",
    "1.e",
    "--1",
    "tru e",
    "nul",
    "01",
    '"a" "b"',
    "{]",
    "[}",
]


def records(rng: random.Random, count: int) -> str:
    """An arguments object made of many short keys, strings, numbers and literals (rows to save)."""
    rows = [
        {
            "id": i,
            "name": f"item{i}",
            "tags": ["a", "b"][: rng.randint(0, 2)],
            "price": round(rng.uniform(0, 99), 2),
        }
        for i in range(count)
    ]
    value = json.dumps({"rows": rows, "ok": True, "note": None}, indent=rng.choice([None, 1]))
    if rng.random() < 0.4:
        cut = rng.randint(0, len(value))
        value = value[:cut] + rng.choice(STRUCTURE_BREAKING) + value[cut:]
    return value


@pytest.mark.parametrize("parser", JSON_PARSERS, ids=lambda p: f"{type(p).__name__}-{p.max_calls}")
def test_arguments_broken_anywhere_in_their_structure_send_what_whole_scans_send(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(17)
    cases = []
    for _ in range(60):
        arguments = records(rng, rng.randint(0, 4))
        call = f'{{"name": "save", "arguments": {arguments}}}'
        if isinstance(parser, HermesParser):
            text = f"Rows: <tool_call>\n{call}\n</tool_call>"
        elif isinstance(parser, MistralParser):
            text = f"[TOOL_CALLS]save[ARGS]{arguments}"
        elif isinstance(parser, GraniteParser):
            text = f"Rows: <|tool_call|>[{call}]"
        elif isinstance(parser, Llama3JsonParser):
            text = call.replace('"arguments"', '"parameters"')
        else:
            text = f"[{call}]"
        text = text[: rng.randint(0, len(text))] if rng.random() < 0.3 else text
        cases.append((text, rng.random() < 0.3, small_chunks(text, rng)))
    assert_carried_as_whole(parser, cases, monkeypatch)


# Mistral's [ARGS] take an object, never a string.
LONG_CALL_CASES = [
    (p, s) for p in JSON_PARSERS[::2] for s in (False, True) if not (s and isinstance(p, MistralParser))
]


@pytest.mark.parametrize(
    ("parser", "stringified"),
    LONG_CALL_CASES,
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_a_long_call_of_short_strings_is_read_whole_a_few_times_only(
    parser: ToolParser, stringified: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of many rows (keys, short strings, numbers) is read on from each delta: the whole output
    is scanned again only around the call's start and end, however long the call grows."""
    rng = random.Random(3)
    arguments = json.dumps({"rows": [{"id": i, "name": f"item{i}", "on": i % 2 == 0} for i in range(300)]})
    if stringified:
        arguments = json.dumps(arguments)  # arguments given as a JSON string: sent once it closes
    if isinstance(parser, MistralParser):
        text = f"[TOOL_CALLS]save[ARGS]{arguments}"
    elif isinstance(parser, GraniteParser):
        text = f'<|tool_call|>[{{"name": "save", "arguments": {arguments}}}]'
    elif isinstance(parser, RequiredCallsParser):
        text = f'[{{"name": "save", "parameters": {arguments}}}]'
    elif isinstance(parser, Llama3JsonParser):
        text = f'{{"name": "save", "parameters": {arguments}}}'
    else:
        text = f'<tool_call>\n{{"name": "save", "arguments": {arguments}}}\n</tool_call>'
    pieces = small_chunks(text, rng)
    scans = 0
    whole_scan = type(parser).scan

    def counted(self: ToolParser, output: str, final: bool) -> Scan:
        nonlocal scans
        scans += 1
        return whole_scan(self, output, final)

    monkeypatch.setattr(type(parser), "scan", counted)
    sent = deltas(parser, pieces, cut_short=False)
    assert scans < 60, (scans, len(pieces))  # of ~2,900 deltas: the markup around the call only
    streamed = "".join(piece.arguments for delta in sent for piece in delta.tool_calls)
    assert json.loads(streamed) == json.loads(json.loads(arguments) if stringified else arguments)


# Qwen3-Coder (and Seed-OSS, its calls in tags of its own): a scan read on from the output's end (text
# after the calls, or a parameter's value still open) against the whole output scanned at every delta.
CODER_TOOLS = (
    FunctionTool(
        "write",
        None,
        {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "n": {"type": ["integer", "null"]},
                "flags": {"type": "object"},
                "ok": {"type": "boolean"},
            },
        },
    ),
)
CODER_FAMILIES = pytest.mark.parametrize(
    "family", [Qwen3CoderParser, SeedOssParser], ids=["qwen3_coder", "seed_oss"]
)
# Text around calls: plain, blank, and what may begin, end or imitate the markup.
CODER_TEXT = ["Sure.", " ", "\n", "  \n", "Is 3 < 4?", "<b>", "<", "<tool", "<tool_call", "</tool_call>"]
CODER_TEXT += ["a</parameter>", "<function=write>", "é😀", "x"]
CODER_TEXT += ["<seed:", "<seed:tool_call", "</seed:tool_call>"]
# A string value's pieces: code, and the closing tags (whole, cut off, or followed by what may make them
# the value's end or not).
CODER_VALUE = ["def f(x):", "\n", "    ", "return x", "<", "</", "</param", "</parameter>", "</parameter> x"]
CODER_VALUE += ["</parameter>\n", "</parameter>\n<b>", "</parameter>\n</func", "</parameter>  <parameter"]
CODER_VALUE += ["<parameter=", "</function>", "</tool_call>", "<tool_call>", '"q"', "\\n", "{", "é", "  \n\n"]
CODER_VALUE += ["</seed:tool_call>", "<seed:tool_call>"]
TYPED_VALUES = {
    "n": ["1", " 5 ", "None", "x", "-2.5e3", "</parameter"],
    "flags": ['{"a": [1, "<b>"]}', "{", "[1, 2]", "{}"],
    "ok": ["True", "false", "yes"],
}
# What breaks a call's markup anywhere.
CODER_BREAKING = ["\n", "<", ">", "x", "</parameter>", "<tool_call>", "</function>", "</tool_call>"]
CODER_BREAKING += ["<seed:tool_call>", "</seed:tool_call>"]


def coder_value(rng: random.Random, key: str) -> str:
    if key in TYPED_VALUES:
        return rng.choice(TYPED_VALUES[key])
    return "".join(rng.choice(CODER_VALUE) for _ in range(rng.randint(0, 14)))


def coder_call(rng: random.Random, parser: Qwen3CoderParser) -> str:
    """A call in the parser's tags, its values laid out as its family's template does now and then."""
    start, end_tag = parser.layout.start, parser.layout.end
    name = rng.choice(["write", "write", "write", "other", " write ", "bad\nname", ""])
    parameters = []
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(["text", "text", "n", "flags", "ok", "extra"])
        gap = rng.choice([parser.layout.value_gap, "\n", "", " \n"])
        parameters.append(f"<parameter={key}>{gap}{coder_value(rng, key)}{gap}</parameter>\n")
    end = rng.choice([f"</function>\n{end_tag}"] * 3 + [end_tag, "</function>", f"</function> {end_tag}"])
    call = f"{start}\n<function={name}>\n{''.join(parameters)}{end}"
    if rng.random() < 0.15:
        cut = rng.randint(0, len(call))
        call = call[:cut] + rng.choice(CODER_BREAKING) + call[cut:]
    return call


def coder_output(rng: random.Random, parser: Qwen3CoderParser) -> str:
    def text() -> str:
        return "".join(rng.choice(CODER_TEXT) for _ in range(rng.randint(0, 6)))

    parts = [text()]
    for _ in range(rng.randint(0, 3)):
        parts += [coder_call(rng, parser), text()]
    output = "".join(parts)
    return output[: rng.randint(0, len(output))] if rng.random() < 0.3 else output


@CODER_FAMILIES
@pytest.mark.parametrize("max_calls", [None, 1])
def test_coder_outputs_read_on_from_their_end_send_what_whole_scans_send(
    family: type[Qwen3CoderParser], max_calls: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Text, calls with string and typed values, broken markup and values holding the tags, split into
    deltas anywhere: a stream reading on from its last scan's end sends what scans of the whole
    output send, delta by delta, and finishes the same."""
    rng = random.Random(23)
    parser = family(max_calls, tools=CODER_TOOLS)
    continued = Scan.continued
    carried = 0

    def counted(scan: Scan, delta: str) -> Scan | None:
        nonlocal carried
        result = continued(scan, delta)
        carried += result is not None
        return result

    cases = []
    for _ in range(400):
        text = coder_output(rng, parser)
        pieces = small_chunks(text, rng) if rng.random() < 0.7 else chunks(text, rng)
        cases.append((text, rng.random() < 0.3, pieces))
    # Calls in the family's markup, not text alone.
    assert sum(bool(parser.extract(text).tool_calls) for text, _, _ in cases) > 100
    monkeypatch.setattr(Scan, "continued", counted)
    assert_carried_as_whole(parser, cases, monkeypatch)
    deltas_fed = sum(len(pieces) for _, _, pieces in cases)
    assert carried > deltas_fed // 3, (carried, deltas_fed)


def whole_scans_and_deltas(
    parser: ToolParser, pieces: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[StreamDelta]]:
    """How often a stream fed `pieces` (and finished) scans the whole output, and what it sends."""
    scans = 0
    whole_scan = type(parser).scan

    def counted(self: ToolParser, output: str, final: bool) -> Scan:
        nonlocal scans
        scans += 1
        return whole_scan(self, output, final)

    monkeypatch.setattr(type(parser), "scan", counted)
    sent = deltas(parser, pieces, cut_short=False)
    return scans, sent


@CODER_FAMILIES
def test_a_long_coder_call_is_read_whole_a_few_times_only(
    family: type[Qwen3CoderParser], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of 300 lines (holding tags of its own) written as a string parameter, and a typed one
    after it, fed a few characters at a time: the whole output is scanned again only around the
    markup, however long the value grows."""
    rng = random.Random(7)
    lines = [f"    <b>line {i}</b> < {i} </param {i}\n" for i in range(300)]
    code = "".join(lines)
    parser = family(tools=CODER_TOOLS)
    start, end, gap = parser.layout.start, parser.layout.end, parser.layout.value_gap
    text = (
        f"Writing it.\n{start}\n<function=write>\n<parameter=text>{gap}"
        f"{code}</parameter>\n<parameter=n>{gap}3{gap}</parameter>\n</function>\n{end}\nDone."
    )
    pieces = small_chunks(text, rng)
    scans, sent = whole_scans_and_deltas(parser, pieces, monkeypatch)
    assert scans < 60, (scans, len(pieces))  # of ~4,750 deltas: the markup around the value only
    streamed = "".join(piece.arguments for delta in sent for piece in delta.tool_calls)
    assert json.loads(streamed) == {"text": code.removesuffix("\n"), "n": 3}
    assert "".join(delta.content for delta in sent) == "Writing it.\nDone."


@CODER_FAMILIES
def test_a_long_coder_answer_without_calls_is_read_whole_a_few_times_only(
    family: type[Qwen3CoderParser], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long answer (code, tags, a marker cut off part way that turns out to be text) with tools
    enabled: each delta is read on from the text's end, not with the whole answer again."""
    rng = random.Random(8)
    parser = family(tools=CODER_TOOLS)
    near = parser.layout.start.removesuffix("_call>")  # `<tool`, `<seed:tool`
    text = "Here it is:\n\n" + "".join(f"<b>{i}</b> {near} x {i}\n   \n" for i in range(300)) + "Bye."
    pieces = small_chunks(text, rng)
    scans, sent = whole_scans_and_deltas(parser, pieces, monkeypatch)
    assert scans < 10, (scans, len(pieces))
    assert "".join(delta.content for delta in sent) == text


# The JSON families (Hermes, Mistral, Granite, Llama 3): a scan read on from the output's end (text after
# the calls, or after markup that read as no call) against the whole output scanned at every delta.
READ_ON_PARSERS = [
    HermesParser(),
    HermesParser(max_calls=1),
    MistralParser(),
    MistralParser(max_calls=1),
    GraniteParser(),
    GraniteParser(max_calls=1),
    Llama3JsonParser(),
    Llama3JsonParser(max_calls=1),
]
# Text around calls: plain, blank, and what may begin, end or imitate a family's markup.
MIXED_TEXT = ["Sure.", " ", "\n", "  \n", "Is 3 < 4?", "<b>", "<", "<tool", "<tool_call", "</tool_call>"]
MIXED_TEXT += ["[", "[TOOL", "[TOOL_CALLS", "[ARGS]", "{", "}", ";", "<|python", "é😀", "x"]
MIXED_TEXT += ["<|", "<|tool", "<|tool_call|", "<|tool_call|> "]
LONG_LINE = 'def double(x):\n    return x * 2  # "twice" <b> [1] {2};\n'
# A number at a call object's top level, which a delta may cut before its fraction or exponent.
TOP_NUMBERS = ["7", "-2.5e3", "1.25", "0", "1E+2", "-0.5e-1", "true", "null"]
# What breaks a call's markup anywhere: stray punctuation, a word, a number gone wrong, a marker.
MARKUP_BREAKING = ["x", "}", "]", ",", ":", '"', "\n", "1.", "1e", "01", "-", ";", "{"]
MARKUP_BREAKING += [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|tool_call|>",
]


def mixed_text(rng: random.Random) -> str:
    pieces = [rng.choice(MIXED_TEXT) for _ in range(rng.randint(0, 6))]
    if rng.random() < 0.2:
        pieces.insert(rng.randint(0, len(pieces)), LONG_LINE * rng.randint(1, 6))
    return "".join(pieces)


def numbered_call(rng: random.Random, keys: tuple[str, ...]) -> str:
    """A call object, now and then with a number or literal among its top-level fields."""
    call = hard_call(rng, keys)
    if rng.random() < 0.4:
        call = call[:-1] + f', "id": {rng.choice(TOP_NUMBERS)}}}'
    return call


def mixed_call(parser: ToolParser, rng: random.Random) -> str:
    """One stretch of a family's call markup, closed or not, broken somewhere now and then."""
    if isinstance(parser, HermesParser):
        gap = rng.choice(["\n", "", " "])
        end = rng.choice(["</tool_call>"] * 3 + ["", "</tool", " </tool_call>", "\n"])
        call = f"<tool_call>{gap}{numbered_call(rng, ('arguments', 'parameters'))}{gap}{end}"
    elif isinstance(parser, MistralParser):
        if rng.random() < 0.5:
            call = f"[TOOL_CALLS]{rng.choice(['write', 'write', ''])}[ARGS]{hard_arguments(rng)}"
        else:
            objects = ", ".join(numbered_call(rng, ("arguments",)) for _ in range(rng.randint(1, 2)))
            call = f"[TOOL_CALLS][{objects}]"
    elif isinstance(parser, GraniteParser):
        objects = ", ".join(numbered_call(rng, ("arguments", "parameters")) for _ in range(rng.randint(0, 2)))
        call = "<|tool_call|>" + rng.choice(["", " ", "\n"]) + f"[{objects}]"
    else:
        call = numbered_call(rng, ("parameters", "arguments"))
    if rng.random() < 0.2:
        cut = rng.randint(0, len(call))
        call = call[:cut] + rng.choice(MARKUP_BREAKING) + call[cut:]
    return call


def mixed_output(parser: ToolParser, rng: random.Random) -> str:
    """Text (long now and then), calls, broken markup and text after the calls. Llama 3's calls open
    the output (else it is all text), `;` apart."""
    if isinstance(parser, Llama3JsonParser):
        calls = "; ".join(mixed_call(parser, rng) for _ in range(rng.randint(0, 3)))
        head = rng.choice(["", "", "<|python_tag|>", " ", mixed_text(rng)])
        output = head + calls + mixed_text(rng)
    else:
        parts = [mixed_text(rng)]
        for _ in range(rng.randint(0, 3)):
            parts += [mixed_call(parser, rng), mixed_text(rng)]
        output = "".join(parts)
    return output[: rng.randint(0, len(output))] if rng.random() < 0.3 else output


@pytest.mark.parametrize("parser", READ_ON_PARSERS, ids=lambda p: f"{type(p).__name__}-{p.max_calls}")
def test_json_family_outputs_read_on_from_their_end_send_what_whole_scans_send(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long text, markers cut off part way, calls (numbers cut anywhere among their fields), broken
    markup and text after the calls, split into deltas anywhere: a stream reading on from its last
    scan's end sends what scans of the whole output send, delta by delta, and finishes the same."""
    rng = random.Random(29)
    continued = Scan.continued
    carried = 0

    def counted(scan: Scan, delta: str) -> Scan | None:
        nonlocal carried
        result = continued(scan, delta)
        carried += result is not None and scan.end is not None
        return result

    cases = []
    for _ in range(300):
        text = mixed_output(parser, rng)
        pieces = small_chunks(text, rng) if rng.random() < 0.7 else chunks(text, rng)
        cases.append((text, rng.random() < 0.3, pieces))
    monkeypatch.setattr(Scan, "continued", counted)
    assert_carried_as_whole(parser, cases, monkeypatch)
    # Deltas read on from the text at the output's end, not with the calls' arguments.
    deltas_fed = sum(len(pieces) for _, _, pieces in cases)
    assert carried > deltas_fed // 4, (carried, deltas_fed)


def long_answer(parser: ToolParser) -> str:
    """An answer of 300 lines of code, holding a marker cut off part way now and then (held back, then
    text) and, for Mistral and Granite, a whole marker that no call follows (the rest is text)."""
    near_marker = {
        HermesParser: "<tool x",
        MistralParser: "[TOOL x",
        GraniteParser: "<|tool_call x",
        Llama3JsonParser: "<|python x",
    }
    lines = [f"<b>{i}</b> {{{i}}}; {near_marker[type(parser)]} {i}\n   \n" for i in range(300)]
    if isinstance(parser, MistralParser):
        lines[150] = "[TOOL_CALLS] is a marker\n"
    if isinstance(parser, GraniteParser):
        lines[150] = "<|tool_call|> is a marker\n"
    return "Here it is:\n\n" + "".join(lines) + "Bye."


@pytest.mark.parametrize("parser", READ_ON_PARSERS[::2], ids=lambda p: type(p).__name__)
def test_a_long_json_family_answer_without_calls_is_read_whole_a_few_times_only(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long answer with tools enabled: each delta is read on from the text's end, not with the whole
    answer again."""
    text = long_answer(parser)
    pieces = small_chunks(text, random.Random(8))
    scans, sent = whole_scans_and_deltas(parser, pieces, monkeypatch)
    assert scans < 10, (scans, len(pieces))
    assert "".join(delta.content for delta in sent) == text


@pytest.mark.parametrize("parser", READ_ON_PARSERS[::2], ids=lambda p: type(p).__name__)
def test_long_text_after_a_json_family_call_is_read_whole_a_few_times_only(
    parser: ToolParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call, then a long answer: only the deltas around the call's markup read the whole output."""
    arguments = '{"path": "a.py"}'
    if isinstance(parser, HermesParser):
        call = f'<tool_call>\n{{"name": "write", "arguments": {arguments}}}\n</tool_call>'
    elif isinstance(parser, MistralParser):
        call = f"[TOOL_CALLS]write[ARGS]{arguments}"
    elif isinstance(parser, GraniteParser):
        call = f'<|tool_call|>[{{"name": "write", "arguments": {arguments}}}]'
    else:
        call = f'{{"name": "write", "parameters": {arguments}}}'
    answer = long_answer(parser)
    pieces = small_chunks(f"{call}\n{answer}", random.Random(4))
    scans, sent = whole_scans_and_deltas(parser, pieces, monkeypatch)
    assert scans < 40, (scans, len(pieces))
    assert "".join(delta.content for delta in sent) == answer
    assert "".join(piece.arguments for delta in sent for piece in delta.tool_calls) == arguments
