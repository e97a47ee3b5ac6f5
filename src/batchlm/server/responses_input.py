"""A Responses API request read as the chat request it stands for: input items -> chat messages,
flat function tools -> chat tools, `text.format` -> `response_format`; fields that cannot be served
are refused here, and errors the chat path raises are renamed back to the fields the client sent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatCompletionRequest, ChatMessage
from batchlm.server.protocol_responses import ResponsesRequest
from batchlm.server.request_params import MODERATION, UnsupportedRule, refuse_unsupported
from batchlm.server.responses_items import Conversation
from batchlm.validation_errors import param_from_loc

UNSUPPORTED: tuple[UnsupportedRule, ...] = (
    ("conversation", lambda v: v is None, "continue a response by 'previous_response_id', or send it all in 'input'"),
    ("prompt", lambda v: v is None, "stored prompts are not supported"),
    ("background", lambda v: not v, "background responses are not supported"),
    ("background_options", lambda v: not v, "background responses are not supported"),
    ("context_management", lambda v: not v, "conversations are not compacted; 'truncation': 'auto' drops their oldest items instead"),
    ("access_programs", lambda v: not v, "there are no access programs"),
    ("max_tool_calls", lambda v: v is None, "bound the calls with 'parallel_tool_calls'"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "there is one service tier"),
    ("moderation", lambda v: v is None, MODERATION),
)  # fmt: skip
# The `include` that asks for the output text's log-probabilities.
INCLUDE_LOGPROBS = "message.output_text.logprobs"
# Fields the chat request has under the same name and meaning.
SAME_NAMED_FIELDS = (
    "model", "temperature", "top_p", "parallel_tool_calls", "user", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "chat_template_kwargs",
)  # fmt: skip
# Chat field -> the Responses field it came from, for errors the chat path raises.
RENAMED_FIELDS = {
    "max_completion_tokens": "max_output_tokens",
    # SamplingParams' own name for the budget, in its messages.
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "tool_choice.function": "tool_choice",
    "tool_choice.allowed_tools": "tool_choice",
    # The conversation as a whole (a prompt too long), as a param or quoted in a message.
    "messages": "input",
    "'messages'": "'input'",
}
# A message's index (mapped through the origins), a tool's, or one of the names above: a bare
# `messages` only as the whole param, since messages also say "messages" in prose.
_CHAT_PATH = re.compile(
    r"messages\[(\d+)\]|tools\[(\d+)\]\.function|^messages$|"
    + "|".join(re.escape(name) for name in RENAMED_FIELDS if name != "messages")
)


@dataclass
class ChatForm:
    """The chat request, and for each of its messages the input item it came from (for errors)."""

    request: ChatCompletionRequest
    origins: list[str]

    @contextmanager
    def errors_renamed(self) -> Iterator[None]:
        """APIErrors raised inside name the Responses fields, not the chat fields they became."""
        try:
            yield
        except APIError as error:
            error.message = self.rename(error.message)
            error.param = None if error.param is None else self.rename(error.param)
            raise

    def rename(self, text: str) -> str:
        return _renamed(text, self.origins)

    def truncation_cuts(self) -> tuple[list[int], list[int]]:
        """Where the conversation may begin instead (`truncation: "auto"`), earliest first: at a user
        message, then at an assistant one too (an agent's session is one user message and its calls).
        The leading system messages stay, and so does the last message; a tool result keeps its call."""
        messages = self.request.messages
        kept = _leading_system_messages(messages)
        users = [j for j in range(kept + 1, len(messages)) if messages[j].role == "user"]
        turns = [j for j in range(kept + 1, len(messages)) if messages[j].role in ("user", "assistant")]
        return users, turns

    def dropping_until(self, first_kept: int) -> ChatForm:
        """This form without the messages between the leading system ones and `first_kept`."""
        messages, kept = self.request.messages, _leading_system_messages(self.request.messages)
        request = self.request.model_copy(update={"messages": [*messages[:kept], *messages[first_kept:]]})
        return ChatForm(request, [*self.origins[:kept], *self.origins[first_kept:]])


def _leading_system_messages(messages: list[ChatMessage]) -> int:
    count = 0
    while count < len(messages) and messages[count].role in ("system", "developer"):
        count += 1
    return count


def _renamed(text: str, origins: list[str]) -> str:
    """`text` with the chat fields in it spelled as the Responses fields they came from."""

    def replace(match: re.Match[str]) -> str:
        message, tool = match.group(1), match.group(2)
        if message is not None:
            return origins[int(message)] if int(message) < len(origins) else "input"
        if tool is not None:
            return f"tools[{tool}]"
        return RENAMED_FIELDS[match.group(0)]

    return _CHAT_PATH.sub(replace, text)


def chat_form(body: ResponsesRequest, history: list[dict[str, Any]] | None = None) -> ChatForm:
    """The chat request a Responses request stands for, continuing `history` (the stored items of the
    response it names as previous). 400 for what cannot be served."""
    _check_unsupported(body)
    conversation = Conversation()
    if body.instructions is not None:
        conversation.add({"role": "system", "content": body.instructions}, "instructions")
    for item in history or ():
        conversation.read(item, "previous_response_id")
    if isinstance(body.input, str):
        conversation.add({"role": "user", "content": body.input}, "input")
    else:
        for i, item in enumerate(body.input):
            conversation.read(item, f"input[{i}]")
    conversation.end_turn()
    if not conversation.messages:
        raise APIError(400, "'input' must hold at least one item.", param="input")
    chat: dict[str, Any] = {
        "messages": conversation.messages,
        "stream": body.stream,
        "max_completion_tokens": body.max_output_tokens,
        "tools": _chat_tools(body.tools),
        "tool_choice": _chat_tool_choice(body.tool_choice),
        "response_format": _response_format(body),
        "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None,
    }
    if body.stream:  # the stream's last event reports the usage, thinking tokens included
        chat["stream_options"] = {"include_usage": True}
    if INCLUDE_LOGPROBS in (body.include or ()):  # as in OpenAI's API, top_logprobs alone asks for none
        chat.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    chat.update({name: getattr(body, name) for name in SAME_NAMED_FIELDS})
    origins = conversation.origins
    sent = {k: v for k, v in chat.items() if v is not None}
    try:
        request = ChatCompletionRequest.model_validate(sent)
    except ValidationError as error:
        first = error.errors()[0]
        # As for a body the route validates: union members' tags (`literal[...]`, `str`) left out.
        where = param_from_loc(first["loc"], sent) or "input"
        raise APIError(400, _renamed(f"{where}: {first['msg']}", origins), _renamed(where, origins)) from None
    return ChatForm(request, origins)


def item_references(body: ResponsesRequest) -> dict[int, str]:
    """The input's `item_reference` items, which name an item of a stored response: {index: id}. 400
    for one whose id is not a string."""
    references = {}
    for i, item in enumerate(() if isinstance(body.input, str) else body.input):
        if isinstance(item, dict) and _is_reference(item):
            item_id = item.get("id")
            if not isinstance(item_id, str):
                raise APIError(400, f"input[{i}]: 'id' must be a string.", param=f"input[{i}].id")
            references[i] = item_id
    return references


def _is_reference(item: dict[str, Any]) -> bool:
    # A reference's type is optional in OpenAI's API: an item of an id alone names a stored one.
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "id" in item and set(item) <= {"id", "type"})


def with_references(body: ResponsesRequest, items: dict[int, dict[str, Any]]) -> ResponsesRequest:
    """The request with its `item_reference` items replaced by the stored items they name, as if it
    had sent them (and as it is stored)."""
    if not items or isinstance(body.input, str):
        return body
    return body.model_copy(update={"input": [items.get(i, item) for i, item in enumerate(body.input)]})


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items (text as one user message)."""
    return [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input


def _check_unsupported(body: ResponsesRequest) -> None:
    refuse_unsupported(body, UNSUPPORTED)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options")


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return None if tools is None else [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]


# A Responses function tool's fields that chat's functions lack: taken at the value that asks for
# nothing more than a plain function (the openai client's types may send it), refused otherwise.
FUNCTION_TOOL_RULES: tuple[UnsupportedRule, ...] = (
    ("defer_loading", lambda v: not v, "deferred tools (loaded by tool search) are not supported"),
    ("allowed_callers", lambda v: v in (None, ["direct"]), "the model calls tools directly, by its output"),
    ("async", lambda v: not v, "calls are answered by 'function_call_output' items, not asynchronously"),
    ("output_schema", lambda v: v is None, "a function's output is read as the text sent back"),
)  # fmt: skip
RESPONSES_ONLY_FUNCTION_FIELDS = frozenset(name for name, _, _ in FUNCTION_TOOL_RULES)


def _chat_tool(tool: Any, where: str) -> dict[str, Any]:
    _check_function_tool(tool, where, f"{where}.type")
    for name, accepted, why in FUNCTION_TOOL_RULES:
        if not accepted(tool.get(name)):
            raise APIError(400, f"{where}.{name} is not supported by this server: {why}.", f"{where}.{name}")
    function = {
        key: value
        for key, value in tool.items()
        if key != "type" and key not in RESPONSES_ONLY_FUNCTION_FIELDS
    }
    return {"type": "function", "function": function}


def _check_function_tool(tool: Any, where: str, param: str) -> None:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        message = f"{where}: tools of type {kind!r} are not supported (only 'function' tools are)."
        raise APIError(400, message, param)


_TOOL_CHOICE_FORMS = (
    "'tool_choice' must be 'none', 'auto', 'required', {'type': 'function', 'name': <string>} or "
    "{'type': 'allowed_tools', 'mode': 'auto' | 'required', 'tools': [{'type': 'function', 'name': <string>}, ...]}."
)


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") == "allowed_tools":
        return _chat_allowed_tools(choice)
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str) or len(choice) != 2:
        raise APIError(400, _TOOL_CHOICE_FORMS, param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _chat_allowed_tools(choice: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's flat {"type": "allowed_tools", "mode", "tools": [{"type", "name"}]} as chat's
    {"type": "allowed_tools", "allowed_tools": {"mode", "tools": [{"type", "function": {"name"}}]}}."""
    tools = choice.get("tools")
    if set(choice) != {"type", "mode", "tools"} or not isinstance(tools, list):
        raise APIError(400, _TOOL_CHOICE_FORMS, param="tool_choice")
    if choice["mode"] not in ("auto", "required"):
        raise APIError(400, "'tool_choice.mode' must be 'auto' or 'required'.", param="tool_choice.mode")
    named = []
    for i, tool in enumerate(tools):
        where = f"tool_choice.tools[{i}]"
        _check_function_tool(tool, where, where)
        if set(tool) != {"type", "name"} or not isinstance(tool["name"], str):
            raise APIError(400, f"{where} must be {{'type': 'function', 'name': <string>}}.", where)
        named.append({"type": "function", "function": {"name": tool["name"]}})
    return {"type": "allowed_tools", "allowed_tools": {"mode": choice["mode"], "tools": named}}


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    json_schema: dict[str, Any] = {"name": text_format.name or "response", "strict": text_format.strict}
    if text_format.json_schema is not None:
        json_schema["schema"] = text_format.json_schema
    return {"type": "json_schema", "json_schema": json_schema}
