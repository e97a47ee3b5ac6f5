"""Tool use in the prompt: history messages in the form chat templates take them, and for a template
that knows nothing of tools (SmolLM2's ChatML, say) a system prompt that describes the tools and asks for
Hermes-style `<tool_call>` markup, with earlier calls and results written out in that markup."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from batchlm import json_text
from batchlm.tools.harmony import harmony_history, harmony_tools
from batchlm.unicode_text import encodes

TOOLS_PROMPT = (
    "You can call functions to answer the user. These are the functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with its name and arguments, one call per block:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>'
)


class CalledFunction(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def arguments(self) -> str: ...


class HistoryCall(Protocol):
    """A call of an earlier assistant message, as the request sends it back."""

    @property
    def id(self) -> str: ...
    @property
    def function(self) -> CalledFunction: ...


def template_knows_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def template_tool_calls(calls: Sequence[HistoryCall]) -> list[dict[str, Any]]:
    """An assistant message's calls with their arguments as objects, as templates render them. Arguments
    that are not a JSON object (a call that max_tokens cut short, which an agent sends back as it got it)
    stay the text they are, as OpenAI takes them: the template writes that text. Empty or null arguments
    (a call of a function without parameters, as some clients send it) are an empty object, as vLLM
    reads them: as text they would render a call with nothing (or a string) after `"arguments":`."""
    converted = []
    for call in calls:
        text = call.function.arguments
        try:
            arguments = json_text.loads(text) if text.strip() else None
        except ValueError:
            arguments = text
        if arguments is None:
            arguments = {}
        if isinstance(arguments, dict) and not encodes(_json(arguments)):
            arguments = None  # a "\ud800" escape in it: the text keeps it an escape, an object would not
        function = {
            "name": call.function.name,
            "arguments": arguments if isinstance(arguments, dict) else call.function.arguments,
        }
        converted.append({"id": call.id, "type": "function", "function": function})
    return converted


def template_inputs(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    tool_prompt: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The messages and template variables a chat template renders with `tools`: they reach the
    template as its `tools` variable; a template that does not use them gets them in a generic system
    prompt instead (unless not `tool_prompt`: tool_choice "none"), and tool history as text."""
    messages = harmony_history(messages, chat_template)
    tools = harmony_tools(tools, chat_template)
    if not template_knows_tools(chat_template):
        messages = with_generic_tool_prompt(messages, tools if tool_prompt else None)
    if tools is not None:
        chat_template_kwargs = {**(chat_template_kwargs or {}), "tools": tools}
    return messages, chat_template_kwargs


def with_generic_tool_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """`messages` for a template without tool support: calls and results as text, tools in the system
    prompt (added to the first system message, or as a new one)."""
    converted = [_as_text(message) for message in messages]
    if not tools:
        return converted
    prompt = TOOLS_PROMPT.format(tools="\n".join(_json(tool) for tool in tools))
    if converted and converted[0]["role"] == "system":
        first = converted[0]
        converted[0] = {**first, "content": f"{first['content']}\n\n{prompt}" if first["content"] else prompt}
    else:
        converted.insert(0, {"role": "system", "content": prompt})
    return converted


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    calls = message.get("tool_calls")
    if not calls:
        return message
    blocks = [message["content"]] if message["content"] else []
    for call in calls:
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        if isinstance(arguments, str):  # not a JSON object: the text as the model wrote it
            blocks.append(f'<tool_call>\n{{"name": {_json(name)}, "arguments": {arguments}}}\n</tool_call>')
        else:
            blocks.append(f"<tool_call>\n{_json({'name': name, 'arguments': arguments})}\n</tool_call>")
    # The rest of the message (its thinking, for a template that reads it) stays as it is.
    rest = {key: value for key, value in message.items() if key != "tool_calls"}
    return {**rest, "content": "\n".join(blocks)}


def _json(value: Any) -> str:
    """JSON with non-ASCII characters as they are, as chat templates' `tojson` writes it (transformers):
    "東京" costs the model a few tokens and reads as text, "\\u6771\\u4eac" does neither."""
    return json.dumps(value, ensure_ascii=False)
