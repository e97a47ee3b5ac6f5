"""Which tool-call family a chat template picks (auto-detection), and Qwen3-Coder's and Seed-OSS's
values that hold their closing tag as text, streamed or not."""

from __future__ import annotations

import pytest

from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.registry import detect_parser_name
from batchlm.tools.seed_oss import SeedOssParser
from tool_parser_cases import calls_of, stream

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
