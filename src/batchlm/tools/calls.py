"""What tool parsing produces: whole calls for a response, call deltas for a stream."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

_ID_ALPHABET = string.ascii_letters + string.digits
_ID_LENGTH = 24


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random alphanumerics."""
    return "call_" + random_alphanumerics(_ID_LENGTH)


def random_alphanumerics(length: int) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    # The arguments as JSON text, exactly as the client receives them.
    arguments: str


@dataclass(frozen=True)
class ParsedMessage:
    """A complete output split into its text and its calls; content is None when only calls remain."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    # The output ended inside its last call (max_tokens or a stop string): its arguments are as far
    # as they got, and the message does not finish with "tool_calls".
    call_cut_off: bool = False


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of a call: the first carries id and name (arguments ""), later ones only
    arguments fragments."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class StreamDelta:
    content: str
    tool_calls: tuple[ToolCallDelta, ...]
