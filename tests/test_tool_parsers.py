"""Every tool-call parser: complete outputs, and the same outputs streamed in every possible split."""

from __future__ import annotations

import json
import re

import pytest

from batchlm.tools.calls import StreamDelta, ToolCall
from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.json_scan import is_json_prefix
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.registry import detect_parser_name
from batchlm.tools.seed_oss import SeedOssParser

WEATHER = '{"city": "Paris", "unit": "celsius"}'
SMOLLM2_NAMED = '{\n  "city": "Paris",\n  "unit": "celsius"\n}'
SMOLLM2_PARAMETERS = '{\n        "city": "Paris",\n        "unit": "celsius"\n    }'
SMOLLM2_REQUIRED = f'[\n{{\n    "name": "get_weather",\n    "parameters": {SMOLLM2_PARAMETERS}\n}}\n]'
TIME = '{"zone": "CET {x}", "quote": "a \\"b\\" </tool_call>"}'

# Qwen3-Coder's parameters are raw text, typed by the function's schema.
CODER_TOOLS = (
    FunctionTool(
        "get_weather",
        None,
        {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}},
    ),
    FunctionTool(
        "search",
        None,
        {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer"},
                "exact": {"type": ["boolean", "null"]},
                "filters": {"type": "object"},
                "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            },
        },
    ),
)
CODER = Qwen3CoderParser(tools=CODER_TOOLS)
CODER_WEATHER = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>"
)
CODER_SEARCH = (
    '<tool_call>\n<function=search>\n<parameter=query>\n42 </tool_call> "quoted"\nline two\n</parameter>\n'
    "<parameter=limit>\n 5 \n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n"
    '<parameter=filters>\n{"lang": "en"}\n</parameter>\n<parameter=score>\nhigh\n</parameter>\n'
    "<parameter=extra>\n7\n</parameter>\n</function>\n</tool_call>"
)
# Seed-OSS: the same calls in its own tags, each value against its tags (as its template writes them).
SEED = SeedOssParser(tools=CODER_TOOLS)
SEED_WEATHER = (
    "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n"
    "<parameter=unit>celsius</parameter>\n</function>\n</seed:tool_call>"
)
SEED_SEARCH = (
    '<seed:tool_call>\n<function=search>\n<parameter=query>42 </tool_call> "quoted"\nline two</parameter>\n'
    "<parameter=limit> 5 </parameter>\n<parameter=exact>True</parameter>\n"
    '<parameter=filters>{"lang": "en"}</parameter>\n<parameter=score>high</parameter>\n'
    "<parameter=extra>7</parameter>\n</function>\n</seed:tool_call>"
)
SEARCH_ARGUMENTS = json.dumps(
    {
        "query": '42 </tool_call> "quoted"\nline two',
        "limit": 5,
        "exact": True,
        "filters": {"lang": "en"},
        "score": "high",
        "extra": "7",
    }
)

NON_ASCII = '{"city": "東京 😀", "note": "caf\\u00e9 e\u0301 שלום"}'
LONE = '{"a": "\\ud800 東"}'

# (parser, model output, expected content, expected (name, arguments) calls)
CASES: list[tuple[ToolParser, str, str | None, list[tuple[str, str]]]] = [
    (HermesParser(), "Plain text, no call.", "Plain text, no call.", []),
    (HermesParser(), "Is 3 < 4? Yes <tool_ <b>", "Is 3 < 4? Yes <tool_ <b>", []),
    (
        HermesParser(),
        f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        HermesParser(),
        f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
        f'<tool_call>\n{{"arguments": {TIME}, "name": "get_time"}}\n</tool_call>\nDone.',
        "Let me check.\n\nDone.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (HermesParser(), '<tool_call>{"name": "noop"}</tool_call>', None, [("noop", "{}")]),
    (HermesParser(), '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}', None, [("f", '{"a": 1}')]),
    (HermesParser(), "Hi <tool_call> not json </tool_call>", "Hi <tool_call> not json </tool_call>", []),
    # Arguments keep the characters (and the escapes) the model wrote, as OpenAI's do.
    (HermesParser(), f'<tool_call>{{"name": "f", "arguments": {NON_ASCII}}}', None, [("f", NON_ASCII)]),
    # JSON escapes of lone surrogates decode to text no response can encode: they stay escapes.
    (
        HermesParser(),
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": \\"\\ud800 東\\"}"}',
        None,
        [("f", LONE)],
    ),
    (HermesParser(), '<tool_call>{"name": "\\udfff", "arguments": {}}', None, [("\\udfff", "{}")]),
    (HermesParser(), 'Cut <tool_call>{"name": "f", "argu', 'Cut <tool_call>{"name": "f", "argu', []),
    # A number among the call's fields, which a split may cut before its fraction or exponent ("1.").
    (HermesParser(), '<tool_call>{"name": "f", "arguments": {}, "v": -1e3}</tool_call>', None, [("f", "{}")]),
    (Llama3JsonParser(), "The answer is 4.", "The answer is 4.", []),
    (
        Llama3JsonParser(),
        f'{{"name": "get_weather", "parameters": {WEATHER}}}',
        None,
        [("get_weather", WEATHER)],
    ),
    (
        Llama3JsonParser(),
        f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; '
        f'{{"name": "get_time", "parameters": {TIME}}}',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (Llama3JsonParser(), '{"answer": 42}', '{"answer": 42}', []),
    (Llama3JsonParser(), '{"name": "f", "version": 1.25, "parameters": {}} Done.', "Done.", [("f", "{}")]),
    (
        MistralParser(),
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}, '
        f'{{"name": "get_time", "arguments": {TIME}, "id": "abc123def"}}]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        MistralParser(),
        f"Sure.[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]get_time[ARGS]{TIME}",
        "Sure.",
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (MistralParser(), "[TOOL bar] [TOOL_CALLS", "[TOOL bar] [TOOL_CALLS", []),
    (MistralParser(), '[TOOL_CALLS][{"name": "f", "arguments": {}, "v": 2E+1}]', None, [("f", "{}")]),
    (
        GraniteParser(),
        f'<|tool_call|>[{{"name": "get_weather", "arguments": {WEATHER}}}, '
        f'{{"name": "get_time", "arguments": {TIME}}}]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    (
        GraniteParser(),
        f'Let me check.\n<|tool_call|> [{{"arguments": {NON_ASCII}, "name": "f"}}]',
        "Let me check.",
        [("f", NON_ASCII)],
    ),
    (GraniteParser(), '<|tool_call|>[{"name": "noop"}]', None, [("noop", "{}")]),
    (GraniteParser(), '<|tool_call|>[{"name": "f", "parameters": {"a": 1}}]', None, [("f", '{"a": 1}')]),
    (GraniteParser(), '<|tool_call|>[{"name": "f", "arguments": "{\\"a\\": 1}"}]', None, [("f", '{"a": 1}')]),
    (GraniteParser(), "<|tool_call|>[]", None, []),
    (GraniteParser(), "Is a <|tool_ <|tool_call| marker?", "Is a <|tool_ <|tool_call| marker?", []),
    (GraniteParser(), "<|tool_call|> is its marker.", "<|tool_call|> is its marker.", []),
    (
        GraniteParser(),
        '<|tool_call|>{"name": "f", "arguments": {}}',
        '<|tool_call|>{"name": "f", "arguments": {}}',
        [],
    ),
    (GraniteParser(), '<|tool_call|>[{"name": "f", "arguments": {}, "v": -1.5e3}]', None, [("f", "{}")]),
    (CODER, "No call <function=x> here.", "No call <function=x> here.", []),
    (CODER, CODER_WEATHER, None, [("get_weather", WEATHER)]),
    (
        CODER,
        f"Looking.\n{CODER_WEATHER}\n{CODER_SEARCH}\nDone.",
        "Looking.\nDone.",
        [("get_weather", WEATHER), ("search", SEARCH_ARGUMENTS)],
    ),
    (CODER, "<tool_call>\n<function=ping>\n</function>\n</tool_call>", None, [("ping", "{}")]),
    (CODER, "<tool_call> not a function </tool_call>", "<tool_call> not a function </tool_call>", []),
    (
        CODER,
        '<tool_call>\n<function=search>\n<parameter=filters>\n{"a": "\\ud800 東"}\n</parameter>\n</function>\n</tool_call>',
        None,
        [("search", f'{{"filters": {LONE}}}')],
    ),
    (SEED, "No call <function=x> here.", "No call <function=x> here.", []),
    (SEED, SEED_WEATHER, None, [("get_weather", WEATHER)]),
    (
        SEED,
        f"Looking.\n{SEED_WEATHER}\n{SEED_SEARCH}\nDone.",
        "Looking.\nDone.",
        [("get_weather", WEATHER), ("search", SEARCH_ARGUMENTS)],
    ),
    # Qwen3-Coder's layout of a value inside Seed's tags reads the same; Qwen3-Coder's tags are text.
    (SEED, CODER_WEATHER.replace("tool_call>", "seed:tool_call>"), None, [("get_weather", WEATHER)]),
    (SEED, CODER_WEATHER, CODER_WEATHER, []),
    (
        SEED,
        "<seed:tool_call> not a function </seed:tool_call>",
        "<seed:tool_call> not a function </seed:tool_call>",
        [],
    ),
    (NamedFunctionParser("get_weather"), f" {WEATHER} ", None, [("get_weather", WEATHER)]),
    # SmolLM2-135M-Instruct's greedy outputs under the named and required schemas (llguidance).
    (NamedFunctionParser("get_weather"), SMOLLM2_NAMED, None, [("get_weather", SMOLLM2_NAMED)]),
    (
        RequiredCallsParser(),
        SMOLLM2_REQUIRED,
        None,
        [("get_weather", SMOLLM2_PARAMETERS)],
    ),
    (
        RequiredCallsParser(),
        f'[{{"name": "get_weather", "parameters": {WEATHER}}}, {{"name": "get_time", "parameters": {TIME}}}]',
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
]
IDS = [f"{type(case[0]).__name__}-{i}" for i, case in enumerate(CASES)]


def id_format(parser: ToolParser) -> re.Pattern[str]:
    """OpenAI's `call_` ids; Mistral's templates want 9 alphanumerics."""
    return re.compile("[A-Za-z0-9]{9}" if isinstance(parser, MistralParser) else "call_[A-Za-z0-9]{24}")


def calls_of(calls: tuple[ToolCall, ...]) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in calls]


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


def stream(
    parser: ToolParser, chunks: list[str], cut_short: bool = False
) -> tuple[str, list[tuple[str, str]], list[StreamDelta]]:
    """Feed `chunks`, then check OpenAI's delta shape and return (content, calls, deltas)."""
    session = parser.stream()
    deltas = [session.feed(chunk) for chunk in chunks] + [session.finish(cut_short)]
    content = "".join(d.content for d in deltas)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for piece in (p for d in deltas for p in d.tool_calls):
        if piece.index not in names:
            assert piece.index == len(names), "calls are announced in order"
            assert piece.id is not None and id_format(parser).fullmatch(piece.id) and piece.name
            assert piece.arguments == ""
            names[piece.index], arguments[piece.index] = piece.name, ""
        else:
            assert piece.id is None and piece.name is None and piece.arguments
            arguments[piece.index] += piece.arguments
    # Calls that read whole end an output (finish_reason "tool_calls") unless one was cut off.
    assert not session.ends_in_calls or (names and not session.call_cut_off)
    return content, [(names[i], arguments[i]) for i in sorted(names)], deltas


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


# Granite 3.3's system prompt with tools, as its chat template writes it.
GRANITE_TEMPLATE = (
    '{%- elif available_tools %}{%- set system_message = system_message + " You are a helpful assistant '
    "with access to the following tools. When a tool is required to answer the user's query, respond only "
    'with <|tool_call|> followed by a JSON list of tools used." %}'
)


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("{% for tool in tools %}<tool_call>{{ tool | tojson }}</tool_call>{% endfor %}", "hermes"),
        ("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}", "mistral"),
        ('Respond as {"name": function name, "parameters": dictionary}', "llama3_json"),
        ("{{ '<|python_tag|>' }}", "llama3_json"),
        ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", "hermes"),
        (None, "hermes"),
        ("{{- '<tool_call>\\n<function=' + name + '>' }}{{- '<parameter=' + key + '>' }}", "qwen3_coder"),
        # Seed-OSS's: Qwen3-Coder's `<function=` markup in tags of its own.
        (
            "{%- set toolcall_begin_token = '<seed:tool_call>' -%}"
            "{{ toolcall_begin_token + '\\n<function=' + name + '>\\n' }}{{ '<parameter=' + key + '>' }}",
            "seed_oss",
        ),
        (GRANITE_TEMPLATE, "granite"),
        # Granite 3.0/3.1's: a call in history follows the token; the tools' JSON holds "parameters".
        (
            "{%- elif message['role'] == 'assistant_tool_call' %}"
            "{{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' + message['content'] }}"
            '{{- tool | tojson(indent=4) }}{# "parameters": {...} #}',
            "granite",
        ),
        # Granite 4's template teaches Hermes' tag.
        (
            '{{- \'<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' }}',
            "hermes",
        ),
    ],
)
def test_auto_detection_follows_the_chat_template(template: str | None, name: str) -> None:
    assert detect_parser_name(template) == name


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


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


# Qwen3-Coder values that hold the closing tag as text (code, XML), or a call whose `</function>` the
# model left out: a `</parameter>` ends a value only where the next parameter or the function's end
# follows it.
WRITE_TOOLS = (
    FunctionTool(
        "write",
        None,
        {
            "type": "object",
            "properties": {"text": {"type": "string"}, "n": {"type": ["integer", "null"]}},
        },
    ),
)
CODER_TAG_CASES = [
    (
        "<tool_call>\n<function=write>\n<parameter=text>\nsee </parameter> here\n</parameter>\n"
        "<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>",
        None,
        [("write", '{"text": "see </parameter> here", "n": 1}')],
    ),
    (
        "<tool_call>\n<function=write>\n<parameter=text>\n<b></parameter>\n</parameter>\n</function>\n</tool_call>",
        None,
        [("write", '{"text": "<b></parameter>"}')],
    ),
    (
        "Saving.\n<tool_call>\n<function=write>\n<parameter=text>\nx\n</parameter>\n</tool_call>\nDone.",
        "Saving.\nDone.",
        [("write", '{"text": "x"}')],
    ),
    # The template writes a None value as Python's `None`.
    (
        "<tool_call>\n<function=write>\n<parameter=n>\nNone\n</parameter>\n</function>\n</tool_call>",
        None,
        [("write", '{"n": null}')],
    ),
]


# The same in Seed-OSS's markup: its tags, each value against them.
SEED_TAG_CASES = [
    (
        "<seed:tool_call>\n<function=write>\n<parameter=text>see </parameter> here</parameter>\n"
        "<parameter=n>1</parameter>\n</function>\n</seed:tool_call>",
        None,
        [("write", '{"text": "see </parameter> here", "n": 1}')],
    ),
    (
        "<seed:tool_call>\n<function=write>\n<parameter=text><b></parameter></parameter>\n</function>\n"
        "</seed:tool_call>",
        None,
        [("write", '{"text": "<b></parameter>"}')],
    ),
    (
        "Saving.\n<seed:tool_call>\n<function=write>\n<parameter=text>x</parameter>\n</seed:tool_call>\nDone.",
        "Saving.\nDone.",
        [("write", '{"text": "x"}')],
    ),
    (
        "<seed:tool_call>\n<function=write>\n<parameter=n>None</parameter>\n</function>\n</seed:tool_call>",
        None,
        [("write", '{"n": null}')],
    ),
]
TAG_CASE_IDS = ["tag-in-value", "tag-ends-value", "no-end", "none"]


@pytest.mark.parametrize(
    ("parser", "output", "content", "calls"),
    [(Qwen3CoderParser(tools=WRITE_TOOLS), *case) for case in CODER_TAG_CASES]
    + [(SeedOssParser(tools=WRITE_TOOLS), *case) for case in SEED_TAG_CASES],
    ids=[f"qwen3_coder-{i}" for i in TAG_CASE_IDS] + [f"seed_oss-{i}" for i in TAG_CASE_IDS],
)
def test_a_coder_value_may_hold_its_closing_tag(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    parsed = parser.extract(output)
    assert (parsed.content, calls_of(parsed.tool_calls)) == (content, calls)
    for chunks in [list(output), *([output[:split], output[split:]] for split in range(len(output) + 1))]:
        assert stream(parser, chunks)[:2] == (content or "", calls), chunks


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
