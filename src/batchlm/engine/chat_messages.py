"""Chat messages as OpenAI clients send them, turned into the messages a chat template renders: text
parts joined into one string, `developer` as `system`, earlier tool calls with their arguments as
objects. The HTTP API and the offline `LLM.chat` both go through here, so a conversation renders to
the same prompt either way; what cannot be served is a RequestRejectedError naming the field. The
message models are here too (the HTTP request bodies, server/protocol.py, build on them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from batchlm.engine.client import RequestRejectedError
from batchlm.tools.prompting import template_tool_calls
from batchlm.validation_errors import most_specific, param_from_loc

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class StrictModel(BaseModel):
    """Unknown fields are an error (OpenAI answers 'Unrecognized request argument'), never ignored; so
    are NaN and infinities in numeric fields (JSON parsers accept NaN, and it compares false with any
    bound, so range checks alone would let it through)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionCall(StrictModel):
    name: str
    # The arguments as a JSON string, as responses carry them.
    arguments: str
    # The openai client's parse helpers add the arguments parsed, and send the call back with them.
    parsed_arguments: Any = None


def function_type_only(kind: str, error_type: str, plural: str, noun: str) -> str:
    """`kind` if it is "function"; else a validation error saying `plural` of that type are not
    served. OpenAI's other kinds (custom, web_search, ...) carry no `function`: said here, the client
    learns what is not served rather than that `function` is missing."""
    if kind != "function":
        raise PydanticCustomError(
            error_type,
            f"{plural} of type {{kind}} are not supported (only 'function' {noun} are)",
            {"kind": repr(kind)},
        )
    return kind


class MessageToolCall(StrictModel):
    """A call of an earlier assistant message, sent back as history."""

    id: str
    type: str = "function"
    function: FunctionCall
    # A call accumulated from a stream (the openai client's stream helpers) keeps its index.
    index: int | None = None

    @field_validator("type")
    @classmethod
    def _function_calls_only(cls, kind: str) -> str:
        return function_type_only(kind, "tool_call_type", "tool calls", "calls")


class ChatMessage(StrictModel):
    """One message of a conversation. Content is a string or a list of parts: text parts, and an
    assistant's refusal parts (read as its text); an assistant's `refusal` is its text where it has
    no content."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant message's calls, and a tool message's answer to one of them.
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # An earlier assistant message's thinking, as responses carry it (templates that keep it read it).
    reasoning_content: str | None = None
    # The same under the name vLLM now returns it by (`reasoning`, reasoning_content's successor).
    reasoning: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None
    # What the openai client's message objects also carry when sent back as they came (the Function
    # calling guide's `messages.append(completion.choices[0].message)`): url citations, and the parse
    # helpers' parsed content. Both are read from the content, so they are accepted and not used.
    annotations: list[Any] | None = None
    parsed: Any = None


def parse_messages(messages: Iterable[Any]) -> list[ChatMessage]:
    """Plain message dicts (LLM.chat's input) as the request model the HTTP API validates them with."""
    parsed = []
    for i, message in enumerate(messages):
        try:
            parsed.append(ChatMessage.model_validate(message))
        except ValidationError as error:
            # As the HTTP API reports it: a union's member that read furthest, named as a client writes it.
            problem = most_specific(error.errors(), message)
            field = param_from_loc(problem["loc"], message)
            where = f"messages[{i}]" + (f".{field}" if field else "")
            raise RequestRejectedError(f"{where}: {problem['msg']}", param=where) from None
    return parsed


def template_conversation(
    messages: Sequence[ChatMessage], *, add_generation_prompt: bool, continue_final_message: bool
) -> list[dict[str, Any]]:
    """The messages as the chat template expects them, checked against how the prompt is to end."""
    converted = template_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise RequestRejectedError(
                "'continue_final_message' and 'add_generation_prompt' cannot both be true "
                "(set add_generation_prompt to false to continue the last message).",
                param="continue_final_message",
            )
        if converted[-1]["role"] != "assistant":
            raise RequestRejectedError(
                "'continue_final_message' needs the last message to be from the assistant.",
                param="continue_final_message",
            )
    return converted


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them ({role, content[, name][, tool_calls][, tool_call_id]
    [, reasoning_content] (also read from vLLM's `reasoning`)})."""
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        problem = _message_problem(message)
        if problem is not None:
            text, field = problem
            raise RequestRejectedError(f"{where}: {text}", param=f"{where}.{field}")
        content = _message_text(message, where)
        # Chat templates know "system"; OpenAI's "developer" role means the same for these models.
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = template_tool_calls(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if reasoning is not None:
            entry["reasoning_content"] = reasoning
        converted.append(entry)
    return converted


def final_message_text(messages: Sequence[ChatMessage]) -> str:
    """The text of the last message (its text parts joined), which ends the prompt of a request that
    continues it (continue_final_message)."""
    return _message_text(messages[-1], f"messages[{len(messages) - 1}]") or ""


def _message_problem(message: ChatMessage) -> tuple[str, str] | None:
    """Why a message cannot be served, and the field at fault; None when it can."""
    role = message.role
    if role == "function":
        why = "send the function's result as a 'tool' message with the 'tool_call_id' of the call it answers"
        return f"the deprecated role 'function' is not supported: {why}.", "role"
    if role not in CHAT_ROLES:
        return f"invalid role '{role}'; expected one of {list(CHAT_ROLES)}.", "role"
    if message.function_call:
        why = "send the call in 'tool_calls' ({'id', 'type': 'function', 'function': {'name', 'arguments'}})"
        return f"the deprecated 'function_call' is not supported: {why}.", "function_call"
    if message.audio:
        why = "this server serves no audio; send what the reply said as 'content'"
        return f"'audio' (an earlier reply's audio) is not supported: {why}.", "audio"
    for name in ("tool_calls", "reasoning_content", "reasoning", "refusal"):
        if getattr(message, name) and role != "assistant":
            return f"only assistant messages carry '{name}'.", name
    if role == "tool" and not message.tool_call_id:
        return "a 'tool' message needs the 'tool_call_id' it answers.", "tool_call_id"
    if role != "tool" and message.tool_call_id is not None:
        return "only 'tool' messages carry 'tool_call_id'.", "tool_call_id"
    if message.content is None and role != "assistant":
        return f"'content' is required for role '{role}'.", "content"
    return None


def _message_text(message: ChatMessage, where: str) -> str | None:
    """A message's text: its content, else an assistant's `refusal` (OpenAI's reply to a request it
    declined, sent back as it came: content null, `refusal` its words, what it said as a refusal part
    is). Only assistant messages get this far with a refusal (_message_problem)."""
    content = _text_content(message.content, where, message.role)
    return content if content or not message.refusal else message.refusal


def _text_content(content: str | list[dict[str, Any]] | None, where: str, role: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        part_type = part.get("type")
        refusal = part.get("refusal")
        if part_type == "refusal" and role == "assistant" and isinstance(refusal, str) and len(part) == 2:
            # An assistant's refusal (OpenAI's reply to a request it declined) is what it said.
            texts.append(refusal)
            continue
        if part_type is None:
            raise RequestRejectedError(
                f"Missing required parameter: '{where}.content[{j}].type' (a text part is "
                "{'type': 'text', 'text': <string>}).",
                param=f"{where}.content[{j}].type",
            )
        if part_type == "refusal" and role != "assistant":
            raise RequestRejectedError(
                f"{where}: only assistant messages carry content parts of type 'refusal'.",
                param=f"{where}.content[{j}].type",
            )
        if part_type == "refusal":
            raise RequestRejectedError(
                f"{where}: a refusal part must be {{'type': 'refusal', 'refusal': <string>}}.",
                param=f"{where}.content[{j}]",
            )
        if part_type != "text":
            raise RequestRejectedError(
                f"{where}: content parts of type '{part_type}' are not supported (only text is served, "
                "in parts {'type': 'text', 'text': <string>}).",
                param=f"{where}.content[{j}].type",
            )
        text = part.get("text")
        # A prompt-cache breakpoint is a caching hint (PromptCacheOptions): accepted, not acted on.
        extra = set(part) - {"type", "text", "prompt_cache_breakpoint"}
        if not isinstance(text, str) or extra:
            raise RequestRejectedError(
                f"{where}: a text part must be {{'type': 'text', 'text': <string>}}.",
                param=f"{where}.content[{j}]",
            )
        texts.append(text)
    return "\n".join(texts)
