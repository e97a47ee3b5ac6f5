"""Every tool-call parser: complete outputs, and the same outputs streamed in every possible split;
outputs cut short, the text around calls, and the finish after a broken call, streamed or not."""

from __future__ import annotations

import json

import pytest

from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from tool_parser_cases import CASES, CODER, IDS, SEED, TIME, WEATHER, calls_of, id_format, stream


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES, ids=IDS)
def test_extract_splits_content_and_calls(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    parsed = parser.extract(output)
    assert parsed.content == content
    assert calls_of(parsed.tool_calls) == calls
    assert all(id_format(parser).fullmatch(call.id) for call in parsed.tool_calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES, ids=IDS)
def test_streaming_matches_extract_at_every_split(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    for split in range(len(output) + 1):
        chunks = [output[:split], output[split:]]
        streamed_content, streamed_calls, _ = stream(parser, chunks)
        assert streamed_content == (content or ""), chunks
        assert streamed_calls == calls, chunks


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES, ids=IDS)
def test_streaming_one_character_at_a_time_leaks_no_markup(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    streamed_content, streamed_calls, _ = stream(parser, list(output))
    assert streamed_calls == calls
    if calls:
        markers = (
            "<tool_call>",
            "</tool_call>",
            "[TOOL_CALLS]",
            "[ARGS]",
            "<|python_tag|>",
            "<|tool_call|>",
            '"name"',
            "<function=",
            "<seed:tool_call>",
            "</seed:tool_call>",
        )
        for marker in markers:
            assert marker not in streamed_content


def test_one_chunk_with_two_complete_calls_streams_both() -> None:
    output = (
        f'<tool_call>{{"name": "get_weather", "arguments": {WEATHER}}}</tool_call>'
        f'<tool_call>{{"name": "get_time", "arguments": {TIME}}}</tool_call>'
    )
    content, calls, deltas = stream(HermesParser(), [output])
    assert content == ""
    assert calls == [("get_weather", WEATHER), ("get_time", TIME)]
    first = deltas[0].tool_calls
    assert [(d.index, d.name is not None) for d in first] == [(0, True), (0, False), (1, True), (1, False)]


def test_arguments_stream_while_they_arrive() -> None:
    session = HermesParser().stream()
    assert (
        session.feed('<tool_call>{"name": "get_weather", "arguments": {"ci').tool_calls[1].arguments == '{"ci'
    )
    assert session.feed('ty": "Paris"').tool_calls[0].arguments == 'ty": "Paris"'
    assert session.feed("}}</tool_call>").tool_calls[0].arguments == "}"


def test_text_that_may_open_a_call_is_held_back_then_released() -> None:
    session = HermesParser().stream()
    assert session.feed("Hello <tool").content == "Hello"
    assert session.feed("kit> fixed").content == " <toolkit> fixed"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    output = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}'
    assert calls_of(HermesParser(max_calls=1).extract(output).tool_calls) == [("a", "{}")]
    _, calls, _ = stream(HermesParser(max_calls=1), list(output))
    assert calls == [("a", "{}")]


def test_a_call_cut_short_adds_no_markup_to_a_stream() -> None:
    output = '<tool_call>{"name": "f", "arguments": {"a": 1'
    content, calls, _ = stream(HermesParser(), [output], cut_short=True)
    assert content == "" and calls == [("f", '{"a": 1')]
    # The model itself ended the output there: the markup is text, as in the whole reply.
    content, calls, _ = stream(HermesParser(), [output])
    assert content == output == HermesParser().extract(output).content
    assert calls == [("f", '{"a": 1')]


# Outputs cut short (by max_tokens or a stop string), each with its content and the calls a stream of it
# sends (the last as far as it got). Markup cut off before it could be read as a call is not content.
CUT_SHORT: list[tuple[ToolParser, str, str | None, list[tuple[str, str]]]] = [
    (HermesParser(), '<tool_call>{"name": "f", "arguments": {"a": 1', None, [("f", '{"a": 1')]),
    (HermesParser(), 'Cut <tool_call>{"name": "f", "argu', "Cut", []),
    (
        HermesParser(),
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>\n{"name',
        None,
        [("f", "{}")],
    ),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"ci', None, [("get_weather", '{"ci')]),
    (
        MistralParser(),
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci',
        None,
        [("get_weather", '{"ci')],
    ),
    (
        GraniteParser(),
        f'Sure.<|tool_call|>[{{"name": "get_weather", "arguments": {WEATHER}}}, {{"name": "get_time", "arguments": {{"zo',
        "Sure.",
        [("get_weather", WEATHER), ("get_time", '{"zo')],
    ),
    (GraniteParser(), "Sure. <|tool_call|>[", "Sure.", []),
    (NamedFunctionParser("get_weather"), '{"city": "Par', None, [("get_weather", '{"city": "Par')]),
    (
        CODER,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\ncel",
        None,
        [("get_weather", '{"city": "Paris"')],
    ),
    (
        SEED,
        "Sure.\n<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=unit>cel",
        "Sure.",
        [("get_weather", '{"city": "Paris"')],
    ),
    (
        RequiredCallsParser(),
        f'[{{"name": "get_weather", "parameters": {WEATHER}}}, {{"name": "get_time", "parameters": {{"zo',
        None,
        [("get_weather", WEATHER), ("get_time", '{"zo')],
    ),
]


@pytest.mark.parametrize(
    ("parser", "output", "content", "calls"), CUT_SHORT, ids=[type(c[0]).__name__ for c in CUT_SHORT]
)
def test_an_output_cut_short_gives_what_its_stream_sent(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    parsed = parser.extract(output, cut_short=True)
    assert (parsed.content, calls_of(parsed.tool_calls)) == (content, calls)
    assert all(id_format(parser).fullmatch(call.id) for call in parsed.tool_calls)
    # The last call is cut off where its arguments are not yet JSON; the message then does not finish
    # with "tool_calls", streamed or not.
    assert parsed.call_cut_off == (bool(calls) and not _is_json(calls[-1][1]))
    session = parser.stream()
    session.feed(output), session.finish(cut_short=True)
    assert (session.call_cut_off, session.ends_in_calls) == (
        parsed.call_cut_off,
        bool(calls) and not parsed.call_cut_off,
    )
    for split in range(len(output) + 1):
        chunks = [output[:split], output[split:]]
        streamed_content, streamed_calls, _ = stream(parser, chunks, cut_short=True)
        assert (streamed_content, streamed_calls) == (parsed.content or "", calls)
    if calls:
        assert parsed.content is None or not any(
            marker in parsed.content
            for marker in ("<tool_call>", "[TOOL_CALLS]", "<|tool_call|>", "<seed:tool_call>")
        )


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def hermes(name: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{}}}}\n</tool_call>'


def coder(name: str) -> str:
    return f"<tool_call>\n<function={name}>\n</function>\n</tool_call>"


def seed(name: str) -> str:
    return f"<seed:tool_call>\n<function={name}>\n</function>\n</seed:tool_call>"


# Text around calls, as models write it: (parser, output, content). Whitespace joining two texts across
# calls is kept (the model's before the first call, else after the last); blanks that only separate the
# content from a call at its start or end are not.
AROUND: list[tuple[ToolParser, str, str | None]] = [
    (HermesParser(), f"Hi {hermes('f')} there", "Hi there"),
    (HermesParser(), f"Let me check.\n\n{hermes('f')}\n\nDone.\n", "Let me check.\n\nDone.\n"),
    (HermesParser(), f"A{hermes('f')}\nB", "A\nB"),
    (HermesParser(), f"A{hermes('f')}B", "AB"),
    (HermesParser(), f"One,\n{hermes('f')}\n{hermes('g')}\ntwo, {hermes('h')} three.", "One,\ntwo, three."),
    (HermesParser(), f"\n\n{hermes('f')}\n\nAfter.  ", "After.  "),
    (HermesParser(), f"  Indented {hermes('f')}  \n", "  Indented"),
    (HermesParser(), f"{hermes('f')}\n{hermes('g')}\n", None),
    (MistralParser(), 'Hi [TOOL_CALLS][{"name": "f", "arguments": {}}] there', "Hi there"),
    (MistralParser(), "Sure.\n[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]{}\nDone.", "Sure.\nDone."),
    (GraniteParser(), 'Hi <|tool_call|>[{"name": "f", "arguments": {}}] there', "Hi there"),
    (GraniteParser(), 'Sure.\n\n<|tool_call|>[{"name": "f", "arguments": {}}]\n', "Sure."),
    (Llama3JsonParser(), '{"name": "f", "parameters": {}}\n\nThat is all.', "That is all."),
    (CODER, f"Hi {coder('ping')} there", "Hi there"),
    (CODER, f"Looking.\n\n{coder('ping')}\n{coder('pong')}\n\nDone.", "Looking.\n\nDone."),
    (SEED, f"Hi {seed('ping')} there", "Hi there"),
    (SEED, f"Looking.\n\n{seed('ping')}\n{seed('pong')}\n\nDone.", "Looking.\n\nDone."),
]


@pytest.mark.parametrize(
    ("parser", "output", "content"), AROUND, ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(AROUND)]
)
def test_text_around_calls_keeps_the_whitespace_that_joined_it(
    parser: ToolParser, output: str, content: str | None
) -> None:
    for cut_short in (False, True):
        parsed = parser.extract(output, cut_short)
        expected = content if not cut_short else (content or "").rstrip() or None
        assert parsed.content == expected
        for chunks in [list(output), [output], *([output[:at], output[at:]] for at in range(len(output)))]:
            assert stream(parser, chunks, cut_short)[0] == (expected or ""), chunks


# Outputs with a call that reads and, after it, markup that stops parsing (or that the output ends in).
BROKEN_AFTER_A_CALL: list[tuple[ToolParser, str]] = [
    (
        HermesParser(),
        f'Let me see.\n{hermes("f")}\n<tool_call>\n{{"name": "g", "arguments": {{"a": }}\n</tool_call>',
    ),
    (HermesParser(), f'{hermes("f")}\n<tool_call>\n{{"name": "g", "arguments": {{"a": "Par'),
    (MistralParser(), '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{"a": }'),
    (MistralParser(), '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{"a": "Par'),
    (
        GraniteParser(),
        '<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]<|tool_call|>[{"name": "g", "arguments": {"a": }}]',
    ),
    (
        GraniteParser(),
        '<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]\n<|tool_call|>[{"name": "g", "arguments": {"a": "Par',
    ),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"a": }}'),
    (Llama3JsonParser(), '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {"a": "Par'),
    (CODER, f"{coder('ping')}\n<tool_call>\n<function=search>\n<query>x</query>\n</tool_call>"),
    (CODER, f"{coder('ping')}\n<tool_call>\n<function=search>\n<parameter=query>\nPar"),
    (SEED, f"{seed('ping')}\n<seed:tool_call>\n<function=search>\n<query>x</query>\n</seed:tool_call>"),
    (SEED, f"{seed('ping')}\n<seed:tool_call>\n<function=search>\n<parameter=query>Par"),
]


@pytest.mark.parametrize(
    ("parser", "output"),
    BROKEN_AFTER_A_CALL,
    ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(BROKEN_AFTER_A_CALL)],
)
@pytest.mark.parametrize("cut_short", [False, True], ids=["model-ended", "cut-short"])
def test_the_finish_after_a_broken_call_is_the_same_streamed_or_not(
    parser: ToolParser, output: str, cut_short: bool
) -> None:
    """Whether the reply ends in calls (finish_reason "tool_calls") depends on its text, not on the deltas
    it streamed in: one char at a time, token-like pieces, or whole. A call whose markup stopped parsing
    is no call of the reply (a stream announced it, and cannot take it back); the one before it is."""
    parsed = parser.extract(output, cut_short)
    ends_in_calls = bool(parsed.tool_calls) and not parsed.call_cut_off
    for size in (1, 3, 4, 7, len(output)):
        session = parser.stream()
        deltas = [session.feed(output[at : at + size]) for at in range(0, len(output), size)]
        deltas.append(session.finish(cut_short))
        assert session.ends_in_calls == ends_in_calls, size
        assert session.call_cut_off == parsed.call_cut_off, size
        assert "".join(d.content for d in deltas) == (parsed.content or ""), size
        announced = [d.name for delta in deltas for d in delta.tool_calls if d.name is not None]
        assert announced[: len(parsed.tool_calls)] == [call.name for call in parsed.tool_calls]
    # The call before the broken markup is whole; the broken one is cut off only where the output was
    # cut short inside it.
    assert parsed.tool_calls[0].arguments in ("{}", '{"a": 1}')
    assert ends_in_calls == (not cut_short or not output.endswith("Par"))


def test_a_delta_says_where_its_calls_come_among_its_text() -> None:
    output = f"A {hermes('f')} B {hermes('g')} C"
    delta = HermesParser().stream().feed(output + "\n")
    assert delta.content == "A B C"
    assert [(d.index, d.after) for d in delta.tool_calls] == [(0, 1), (0, 1), (1, 3), (1, 3)]
    session = HermesParser().stream()
    split = output.index("{}") + 1
    assert [d.after for d in session.feed(output[:split]).tool_calls] == [1, 1]
    # A call begun in an earlier delta goes on before any of this one's text.
    assert [(d.index, d.after) for d in session.feed(output[split:]).tool_calls] == [(0, 0), (1, 2), (1, 2)]
