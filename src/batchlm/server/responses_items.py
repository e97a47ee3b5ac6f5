"""A Responses request's input items read as chat messages: messages, function calls and their
outputs, and reasoning items; consecutive assistant items (thinking, then text and calls) become one
assistant turn. A malformed item is a 400 naming it (`input[i]...`) as the client sent it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchlm.server.errors import APIError

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")


@dataclass
class _Turn:
    """An assistant turn being gathered from consecutive items: its thinking, text and calls."""

    origin: str
    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)


class Conversation:
    """Chat messages from input items. Consecutive reasoning, assistant message and function call
    items are one assistant turn (one chat message, as the model wrote them)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []
        self._turn: _Turn | None = None

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.end_turn()
        self.messages.append(message)
        self.origins.append(origin)

    def read(self, item: Any, where: str) -> None:
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: an input item must be an object.", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role is None:
                raise APIError(400, f"Missing required parameter: '{where}.role'.", f"{where}.role")
            if role not in INPUT_ROLES:
                expected = ", ".join(f"'{r}'" for r in INPUT_ROLES)
                raise APIError(
                    400, f"{where}: invalid role {role!r}; expected one of {expected}.", f"{where}.role"
                )
            text = _text(item.get("content"), f"{where}.content")
            if role != "assistant":
                self.add({"role": role, "content": text}, where)
                return
            # Text after the turn's calls is still its text: a reply that wrote some after a call is
            # laid out as [message, function_call, message], and read back as one chat turn (content
            # and tool_calls, as chat's reply gives it and chat clients send it back) its tool outputs
            # follow the turn with their calls, not a second assistant turn the template never saw.
            self._assistant(where).text.append(text)
        elif kind == "function_call":
            function = {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}
            call = {"id": _call_id(item, where), "type": "function", "function": function}
            self._assistant(where).calls.append(call)
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"{where}.output")
            self.add({"role": "tool", "tool_call_id": _call_id(item, where), "content": output}, where)
        elif kind == "reasoning":
            turn = self._assistant(where)
            if turn.text or turn.calls:  # thinking comes first in a turn: after them, the next one's
                turn = self._assistant(where, new=True)
            turn.reasoning.append(_reasoning_text(item, where))
        else:
            served = "'message', 'function_call', 'function_call_output' and 'reasoning' are"
            if kind in ("custom_tool_call", "custom_tool_call_output"):  # as custom tools are not
                served += "; only 'function' tools are served, so calls are 'function_call' items"
            raise APIError(
                400, f"{where}: items of type {kind!r} are not supported ({served}).", f"{where}.type"
            )

    def end_turn(self) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        message: dict[str, Any] = {"role": "assistant", "content": "".join(turn.text) if turn.text else None}
        if turn.calls:
            message["tool_calls"] = turn.calls
        if turn.reasoning:
            message["reasoning_content"] = "".join(turn.reasoning)
        self.messages.append(message)
        self.origins.append(turn.origin)

    def _assistant(self, where: str, new: bool = False) -> _Turn:
        if new:
            self.end_turn()
        if self._turn is None:
            self._turn = _Turn(where)
        return self._turn


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"{where}: '{name}' must be a string.", param=f"{where}.{name}")
    return value


def _call_id(item: dict[str, Any], where: str) -> str:
    """A call's id, which its output names: an empty one would answer no call (chat's 'tool' message
    needs the id it answers), so it is refused as the field the client sent."""
    call_id = _string(item, "call_id", where)
    if not call_id:
        raise APIError(400, f"{where}: 'call_id' must not be empty.", param=f"{where}.call_id")
    return call_id


def _text(content: Any, where: str) -> str:
    """A message's content (or a function call's output): a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: must be a string or a list of text parts.", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in TEXT_PARTS:
            raise APIError(
                400, f"{where}[{j}]: a text part needs a string 'text'.", param=f"{where}[{j}].text"
            )
        elif not isinstance(part, dict):
            raise APIError(400, f"{where}[{j}]: a part must be an object.", param=f"{where}[{j}]")
        elif kind is None:
            raise APIError(400, f"Missing required parameter: '{where}[{j}].type'.", f"{where}[{j}].type")
        elif kind == "refusal":
            raise APIError(
                400, f"{where}[{j}]: a refusal part needs a string 'refusal'.", param=f"{where}[{j}].refusal"
            )
        elif kind == "text":  # chat's text part
            served = "the Responses API's text parts are of type 'input_text' or 'output_text'"
            raise APIError(
                400, f"{where}[{j}]: parts of type 'text' are not supported ({served}).", f"{where}[{j}].type"
            )
        else:
            raise APIError(
                400,
                f"{where}[{j}]: parts of type {kind!r} are not supported (this server serves text only).",
                param=f"{where}[{j}].type",
            )
    return "".join(texts)


def _reasoning_text(item: dict[str, Any], where: str) -> str:
    """An earlier turn's thinking: its text, else its summary (encrypted content has none to read)."""
    content = _reasoning_parts(item.get("content"), "reasoning_text", f"{where}.content")
    summary = _reasoning_parts(item.get("summary"), "summary_text", f"{where}.summary")
    return content or summary


def _reasoning_parts(parts: Any, part_type: str, where: str) -> str:
    """The text of a reasoning item's `content` or `summary`: a list of parts of `part_type`. Anything
    else (a plain string among them) is a 400 naming the field, not thinking read as empty."""
    form = f"{{'type': '{part_type}', 'text': <string>}}"
    if parts is None:
        return ""
    if not isinstance(parts, list):
        raise APIError(400, f"{where}: must be a list of {form} parts.", param=where)
    texts = []
    for j, part in enumerate(parts):
        if (
            not isinstance(part, dict)
            or part.get("type") != part_type
            or not isinstance(part.get("text"), str)
        ):
            raise APIError(400, f"{where}[{j}]: a part must be {form}.", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "".join(texts)
