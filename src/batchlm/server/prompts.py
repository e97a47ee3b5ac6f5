"""API input to token ids: chat messages through the chat template, text prompts through the tokenizer.
All but short inputs are tokenized in worker threads: the Rust tokenizer releases the GIL, so hundreds
of requests arriving together are tokenized in parallel while the event loop keeps streaming."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from jinja2 import TemplateError

from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatMessage

T = TypeVar("T")

CHAT_ROLES = ("system", "developer", "user", "assistant")
# Inputs longer than this (characters) are tokenized in a worker thread. ~1,400 characters take ~1 ms
# to tokenize; below a few hundred the hand-off to a thread would cost more than it frees.
OFFLOAD_CHARS = 512


async def _maybe_offload(size: int, work: Callable[[], T]) -> T:
    return await asyncio.to_thread(work) if size > OFFLOAD_CHARS else work()


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them ({role, content[, name]}); 400 for what we cannot serve."""
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        _check_message(message, where)
        content = _text_content(message.content, where)
        if content is None and message.role != "assistant":
            raise APIError(
                400, f"{where}: 'content' is required for role '{message.role}'.", param=f"{where}.content"
            )
        # Chat templates know "system"; OpenAI's "developer" role means the same for these models.
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if message.name:
            entry["name"] = message.name
        converted.append(entry)
    return converted


def _check_message(message: ChatMessage, where: str) -> None:
    if message.role in ("tool", "function"):
        raise APIError(
            400,
            f"{where}: role '{message.role}' needs tool calling, which is not supported.",
            f"{where}.role",
        )
    if message.role not in CHAT_ROLES:
        raise APIError(
            400,
            f"{where}: invalid role '{message.role}'; expected one of {list(CHAT_ROLES)}.",
            f"{where}.role",
        )
    for name in ("tool_calls", "tool_call_id", "function_call", "audio"):
        if getattr(message, name):
            raise APIError(
                400, f"{where}: '{name}' is not supported (no tool calling or audio).", f"{where}.{name}"
            )


def _text_content(content: str | list[dict[str, Any]] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        part_type = part.get("type")
        if part_type != "text":
            raise APIError(
                400,
                f"{where}: content parts of type '{part_type}' are not supported "
                "(this server serves text only).",
                param=f"{where}.content[{j}].type",
            )
        text = part.get("text")
        extra = set(part) - {"type", "text"}
        if not isinstance(text, str) or extra:
            raise APIError(
                400,
                f"{where}: a text part must be {{'type': 'text', 'text': <string>}}.",
                param=f"{where}.content[{j}]",
            )
        texts.append(text)
    return "\n".join(texts)


async def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> list[int]:
    """Token ids of the conversation rendered by the model's chat template."""
    converted = template_messages(messages)
    _check_continuation(converted, add_generation_prompt, continue_final_message)

    def render() -> list[int]:
        ids: list[int] = tokenizer.apply_chat_template(
            converted,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            continue_final_message=continue_final_message,
        )
        return ids

    try:
        return await _maybe_offload(sum(len(m["content"]) for m in converted), render)
    except (ValueError, TemplateError) as error:
        raise APIError(400, f"Could not apply the chat template: {error}", param="messages") from error


def _check_continuation(
    converted: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool
) -> None:
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise APIError(
            400,
            "'continue_final_message' and 'add_generation_prompt' cannot both be true "
            "(set add_generation_prompt to false to continue the last message).",
            param="continue_final_message",
        )
    if converted[-1]["role"] != "assistant":
        raise APIError(
            400,
            "'continue_final_message' needs the last message to be from the assistant.",
            param="continue_final_message",
        )


async def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    def encode() -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    return await _maybe_offload(len(text), encode)
