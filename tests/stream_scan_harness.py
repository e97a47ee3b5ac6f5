"""What the stream-scan tests share: deltas cut from an output, a stream's deltas with its scans
carried forward (`Scan.continued`) held to those of whole scans, the count of whole scans a stream
makes, the parsers of each family, and generated call objects with hard strings in them."""

from __future__ import annotations

import json
import random

import pytest

from batchlm.tools.calls import StreamDelta
from batchlm.tools.forced import RequiredCallsParser
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.scan import Scan
from batchlm.tools.seed_oss import SeedOssParser


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


# The tool Qwen3-Coder's and Seed-OSS's generated calls write, and both families as a parameter.
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


# The JSON families whose outputs are read on from their end.
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
