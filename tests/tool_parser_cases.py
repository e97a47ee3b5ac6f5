"""What the tool-call parser tests share: model outputs of every family with the content and calls
each holds (CASES, also streamed through the Responses formatter), and `stream`, which feeds a parser
chunks and checks OpenAI's delta shape on the way."""

from __future__ import annotations

import json
import re

from batchlm.tools.calls import StreamDelta, ToolCall
from batchlm.tools.forced import NamedFunctionParser, RequiredCallsParser
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.granite import GraniteParser
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
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
