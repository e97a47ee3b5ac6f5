"""Long outputs streamed a few characters a delta (a call of many rows, a long parameter value, a
long answer without calls or after one): the whole output is scanned again only around the markup,
however long the output grows."""

from __future__ import annotations

import json
import random

import pytest

from batchlm.tools.forced import RequiredCallsParser
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.scan import Scan
from stream_scan_harness import (
    CODER_FAMILIES,
    CODER_TOOLS,
    JSON_PARSERS,
    READ_ON_PARSERS,
    deltas,
    small_chunks,
    whole_scans_and_deltas,
)

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
