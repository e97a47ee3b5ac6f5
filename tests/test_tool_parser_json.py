"""The JSON in the JSON families' calls: calls whose JSON goes wrong stream as content, their
arguments no further than a JSON prefix (`is_json_prefix`); JSON past what Python's reader takes
(nesting, long integers); a key given twice; arguments given as an empty string."""

from __future__ import annotations

import json

import pytest

from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.json_scan import is_json_prefix
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from tool_parser_cases import CODER, calls_of, stream

# Calls whose JSON goes wrong part way, the markup after them included: the whole output is content.
MALFORMED: list[tuple[ToolParser, str]] = [
    (
        HermesParser(),
        'Hi.<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
    ),
    (HermesParser(), '<tool_call>{"name": "f", "arguments": {"a": 1}\n</tool_call> Bye'),
    (HermesParser(), '<tool_call>{"name": "f", "arguments": {"a": [1,]}}</tool_call>'),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": }}'),
    (MistralParser(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": \'Paris\'}}]'),
    (MistralParser(), "OK[TOOL_CALLS]get_weather[ARGS]{city: Paris}"),
    (GraniteParser(), '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": 7}]'),
    (GraniteParser(), 'OK <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}} {"a": 1}]'),
]


@pytest.mark.parametrize(
    ("parser", "output"),
    MALFORMED,
    ids=[f"{type(c[0]).__name__}-{i}" for i, c in enumerate(MALFORMED)],
)
def test_a_malformed_call_streams_as_content_and_its_arguments_stop_where_json_breaks(
    parser: ToolParser, output: str
) -> None:
    assert (parser.extract(output).content, parser.extract(output).tool_calls) == (output, ())
    for chunks in [list(output), *([output[:split], output[split:]] for split in range(len(output) + 1))]:
        content, calls, _ = stream(parser, chunks)
        # The text, as in the whole reply; a call announced before its JSON broke stays sent (a
        # stream cannot take it back), its arguments no further than they were JSON.
        assert content == output, chunks
        for _, arguments in calls:
            assert is_json_prefix(arguments, 0) and arguments in output, (chunks, arguments)
        session = parser.stream()
        session.feed(output), session.finish()
        assert not session.ends_in_calls


def test_json_prefixes() -> None:
    docs = [{"a": [1, -2.5e-3, True, None, 'x\\"\u00e9'], "b": {}}, [], "s", 0, -12, [{"k": []}]]
    for doc in docs:
        for text in (json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, ensure_ascii=False)):
            assert all(is_json_prefix(text[:end], 0) for end in range(len(text) + 1)), text
    for text in [
        '{"a": Paris',
        '{"a": 1}}',
        '{"a": 1} x',
        '{"a" 1',
        "[1,]",
        '{"a": 1,}',
        "01",
        "1.e",
        '"\x01',
        "[}",
    ]:
        assert not is_json_prefix(text, 0), text
    assert is_json_prefix('x = {"a": nul', 4) and is_json_prefix('{"a": -Inf', 0)
    # A control character ends a long string's chances at once (and the check does not backtrack).
    assert not is_json_prefix('{"a": "' + "x" * 100_000 + "\x01", 0)
    assert is_json_prefix('{"a": "' + "x" * 100_000 + "\\u00", 0)


# Nested past Python's JSON reader (its recursion limit): a model can write "[" a thousand times.
TOO_DEEP = "[" * 3000 + "]" * 3000


@pytest.mark.parametrize(
    ("parser", "output"),
    [
        (HermesParser(), f'Hi <tool_call>\n{{"name": "f", "arguments": {{"a": {TOO_DEEP}}}}}\n</tool_call>'),
        (HermesParser(), f'<tool_call>{{"name": {TOO_DEEP}, "arguments": {{}}}}</tool_call>'),
        (HermesParser(), '<tool_call>{"name": "f", "arguments": {"a": ' + "[" * 3000),
        (Llama3JsonParser(), f'{{"name": "f", "parameters": {{"a": {TOO_DEEP}}}}}'),
        (MistralParser(), f'[TOOL_CALLS][{{"name": "f", "arguments": {{"a": {TOO_DEEP}}}}}]'),
        (GraniteParser(), f'<|tool_call|>[{{"name": "f", "arguments": {{"a": {TOO_DEEP}}}}}]'),
        (NamedFunctionParser("f"), f'{{"a": {TOO_DEEP}}}'),
        (RequiredCallsParser(), f'[{{"name": "f", "parameters": {{"a": {TOO_DEEP}}}}}]'),
    ],
    ids=["hermes", "hermes-name", "hermes-unclosed", "llama3", "mistral", "granite", "named", "required"],
)
def test_arguments_nested_too_deep_for_python_s_reader_are_no_call(parser: ToolParser, output: str) -> None:
    """As a call that never closes: the text, never a RecursionError (which was a 500)."""
    parsed = parser.extract(output)
    assert parsed.tool_calls == () and parsed.content in (output, None)
    calls = parser.stream()
    for end in range(0, len(output), 500):
        calls.feed(output[end : end + 500])
    calls.finish()
    assert not calls.ends_in_calls


LONG_INTEGER = "7" * 5000  # past the 4,300 digits Python's int() converts


@pytest.mark.parametrize(
    ("parser", "output"),
    [
        (HermesParser(), f'<tool_call>{{"name": "f", "arguments": {{"a": {LONG_INTEGER}, "b": 2}}}}</tool_call>'),
        (HermesParser(), f'<tool_call>{{"name": "f", "arguments": {{}}, "v": {LONG_INTEGER}}}</tool_call>'),
        (Llama3JsonParser(), f'{{"name": "f", "parameters": {{"a": {LONG_INTEGER}, "b": 2}}}}'),
        (MistralParser(), f'[TOOL_CALLS][{{"name": "f", "arguments": {{"a": {LONG_INTEGER}, "b": 2}}}}]'),
        (GraniteParser(), f'<|tool_call|>[{{"name": "f", "arguments": {{}}, "v": {LONG_INTEGER}}}]'),
        (NamedFunctionParser("f"), f'{{"a": {LONG_INTEGER}, "b": 2}}'),
        (RequiredCallsParser(), f'[{{"name": "f", "parameters": {{"a": {LONG_INTEGER}, "b": 2}}}}]'),
    ],
    ids=["hermes", "hermes-top-level", "llama3", "mistral", "granite-top-level", "named", "required"],
)  # fmt: skip
def test_an_integer_longer_than_python_converts_is_a_call_s_argument(parser: ToolParser, output: str) -> None:
    """JSON takes integers of any length; Python's reader raised a ValueError past 4,300 digits (a 500
    in a stream)."""
    parsed = parser.extract(output)
    assert [call.name for call in parsed.tool_calls] == ["f"] and parsed.content is None
    for size in (len(output), 500, 7):
        content, calls, _ = stream(parser, [output[at : at + size] for at in range(0, len(output), size)])
        assert content == "" and calls == [("f", parsed.tool_calls[0].arguments)]
    assert (LONG_INTEGER in parsed.tool_calls[0].arguments) == ('"v"' not in output)


def test_a_coder_parameter_nested_too_deep_for_python_s_reader_is_its_text() -> None:
    output = f"<tool_call>\n<function=search>\n<parameter=filters>\n{TOO_DEEP}\n</parameter>\n</function>\n</tool_call>"
    [call] = CODER.extract(output).tool_calls
    assert json.loads(call.arguments) == {"filters": TOO_DEEP}


@pytest.mark.parametrize(
    "parser",
    [HermesParser(), Llama3JsonParser(), MistralParser(), GraniteParser()],
    ids=["hermes", "llama3", "mistral", "granite"],
)
def test_a_key_given_twice_reads_the_same_streamed_or_not(parser: ToolParser) -> None:
    """The first value counts, the one a stream sends before the second arrives."""
    call = '{"name": "f", "arguments": {"a": 1}, "arguments": {"b": 22}, "name": "g"}'
    output = {
        HermesParser: f"<tool_call>{call}</tool_call>",
        Llama3JsonParser: call,
        MistralParser: f"[TOOL_CALLS][{call}]",
        GraniteParser: f"<|tool_call|>[{call}]",
    }[type(parser)]
    assert calls_of(parser.extract(output).tool_calls) == [("f", '{"a": 1}')]
    for chunks in [list(output), *([output[:split], output[split:]] for split in range(len(output) + 1))]:
        assert stream(parser, chunks)[1] == [("f", '{"a": 1}')], chunks
    # Both of the family's argument keys: the first given.
    both = output.replace('"arguments": {"b": 22}', '"parameters": {"b": 22}')
    assert calls_of(parser.extract(both).tool_calls) == [("f", '{"a": 1}')]
    assert stream(parser, list(both))[1] == [("f", '{"a": 1}')]


def test_arguments_given_as_an_empty_string_are_an_empty_object() -> None:
    output = '<tool_call>{"name": "get_time", "arguments": ""}</tool_call>'
    assert calls_of(HermesParser().extract(output).tool_calls) == [("get_time", "{}")]
    assert stream(HermesParser(), list(output))[1] == [("get_time", "{}")]
