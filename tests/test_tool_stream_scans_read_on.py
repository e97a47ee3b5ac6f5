"""Outputs (text, calls, broken markup) read on from their end against a scan of the whole output at
every delta: the same deltas, for Qwen3-Coder's raw values (Seed-OSS's in its own tags) and the JSON
families' text after their calls."""

from __future__ import annotations

import random

import pytest

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
    READ_ON_PARSERS,
    assert_carried_as_whole,
    chunks,
    hard_arguments,
    hard_call,
    small_chunks,
)

# Qwen3-Coder (and Seed-OSS, its calls in tags of its own): a scan read on from the output's end (text
# after the calls, or a parameter's value still open) against the whole output scanned at every delta.
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


# The JSON families (Hermes, Mistral, Granite, Llama 3): a scan read on from the output's end (text after
# the calls, or after markup that read as no call) against the whole output scanned at every delta.
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
