"""A stream's scans carried forward from the last one (`Scan.continued`) against a scan of the whole
output at every delta: the same deltas, over generated calls whose arguments hold long strings,
escapes and keys split anywhere, and arguments broken anywhere in their structure."""

from __future__ import annotations

import json
import random

import pytest

from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.scan import Scan
from batchlm.tools.seed_oss import SeedOssParser
from stream_scan_harness import (
    JSON_PARSERS,
    assert_carried_as_whole,
    chunks,
    hard_arguments,
    hard_call,
    small_chunks,
)

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
