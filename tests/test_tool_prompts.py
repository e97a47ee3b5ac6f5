"""Tools and tool history through real chat templates (transformers' apply_chat_template renders them):
a template that renders tools itself, and SmolLM2's ChatML, which knows no tools."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from batchlm.server.prompts import render_chat
from batchlm.server.protocol import ChatCompletionRequest
from batchlm.tokenizer.tokenizer import Tokenizer
from batchlm.tools.use import chat_tool_use

# A Hermes-style template written for this test: tools in the system turn, calls as <tool_call> JSON.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolLM2-135M-Instruct's chat template.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
]


def rendered(tokenizer: Tokenizer, body: dict[str, Any]) -> str:
    request = ChatCompletionRequest.model_validate({"messages": MESSAGES, **body})
    use = chat_tool_use(request, "auto", tokenizer.chat_template)
    ids = asyncio.run(
        render_chat(
            tokenizer,
            request.messages,
            add_generation_prompt=True,
            continue_final_message=False,
            chat_template_kwargs=None,
            tools=use.template_tools,
            tool_prompt=use.tool_prompt,
        )
    )
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_a_tool_template_gets_the_tools_and_calls_with_object_arguments(tiny_tokenizer: Tokenizer) -> None:
    tokenizer = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=TOOL_TEMPLATE)
    history = [dict(m) for m in MESSAGES]
    history[1] = {**history[1], "content": ""}
    history[1]["tool_calls"] = [
        {**c, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        for c in MESSAGES[1]["tool_calls"]
    ]
    expected = tiny_tokenizer.hf.apply_chat_template(
        history, tools=TOOLS, chat_template=TOOL_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    text = rendered(tokenizer, {"tools": TOOLS})
    assert text.endswith(expected)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert json.dumps(TOOLS[0]) in text or '"get_weather"' in text.split("</tools>")[0]


def test_smollm2_gets_a_generic_tools_prompt_and_history_as_text(tiny_tokenizer: Tokenizer) -> None:
    tokenizer = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=SMOLLM2_TEMPLATE)
    text = rendered(tokenizer, {"tools": TOOLS, "tool_choice": "required"})
    assert text.split("<|im_start|>", 1)[1].startswith("system\nYou can call functions")
    assert "named SmolLM" not in text
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\n21 degrees\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_adds_no_tools_prompt(tiny_tokenizer: Tokenizer) -> None:
    tokenizer = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=SMOLLM2_TEMPLATE)
    text = rendered(tokenizer, {"tools": TOOLS, "tool_choice": "none"})
    assert "You can call functions" not in text and "named SmolLM" in text


def test_history_as_text_keeps_an_assistant_turn_s_thinking() -> None:
    from batchlm.tools.prompting import with_generic_tool_prompt

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "plan"}
    [converted] = with_generic_tool_prompt([turn], None)
    assert converted == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        "reasoning_content": "plan",
    }


def test_the_generic_tools_prompt_writes_non_ascii_as_it_is(tiny_tokenizer: Tokenizer) -> None:
    # As a template's `tojson` does: "東京" as characters, not "\u6771\u4eac" escapes the model would copy.
    tokenizer = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=SMOLLM2_TEMPLATE)
    tools = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "description": "Wetter für 東京 ☀"}}]
    history = [dict(m) for m in MESSAGES]
    history[1]["tool_calls"] = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "東京"}'},
        }
    ]
    text = rendered(tokenizer, {"messages": history, "tools": tools})
    assert '"description": "Wetter für 東京 ☀"' in text
    assert '{"name": "get_weather", "arguments": {"city": "東京"}}' in text
    assert "\\u" not in text


def test_history_arguments_escaping_a_lone_surrogate_render_as_their_text(tiny_tokenizer: Tokenizer) -> None:
    # '{"city": "\ud800"}' is valid JSON whose value is not valid Unicode: as an object the template would
    # write a prompt no tokenizer takes (a 500); the text, escape and all, is what the template gets.
    arguments = '{"city": "\\ud800 東京"}'
    history = [dict(m) for m in MESSAGES]
    history[1]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    ]
    tool_template = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=TOOL_TEMPLATE)
    assert json.dumps(arguments, ensure_ascii=False) in rendered(
        tool_template, {"messages": history, "tools": TOOLS}
    )
    generic = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=SMOLLM2_TEMPLATE)
    text = rendered(generic, {"messages": history, "tools": TOOLS})
    assert f'{{"name": "get_weather", "arguments": {arguments}}}' in text


@pytest.mark.parametrize("arguments", ["", " ", "null"])
def test_history_calls_with_empty_arguments_render_an_empty_object(
    tiny_tokenizer: Tokenizer, arguments: str
) -> None:
    # A call of a function without parameters, as a client that accumulated no argument deltas (or
    # wrote None as JSON) sends it back: an empty object (as vLLM reads it), not a call with nothing
    # after "arguments":, nor the string "null".
    history = [dict(m) for m in MESSAGES]
    history[1]["tool_calls"] = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    ]
    for template in (TOOL_TEMPLATE, SMOLLM2_TEMPLATE):
        tokenizer = Tokenizer(tiny_tokenizer.hf, tiny_tokenizer.eos_token_ids, chat_template=template)
        text = rendered(tokenizer, {"messages": history, "tools": TOOLS})
        assert '{"name": "get_weather", "arguments": {}}' in text
