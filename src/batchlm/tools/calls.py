"""What tool parsing produces: whole calls for a response, call deltas for a stream."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, replace

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
    """A complete output split into its text and its calls; content is None where no text remains (a
    stream, which may hold calls and so opens with content null, sends none then either)."""

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
    # How much of the content sent with it comes before it in the output (text after a call, which a
    # delta may bring with the call, comes after it).
    after: int = 0


@dataclass(frozen=True)
class StreamDelta:
    content: str
    tool_calls: tuple[ToolCallDelta, ...]


def calls_after(calls: tuple[ToolCallDelta, ...], content: str) -> tuple[ToolCallDelta, ...]:
    """`calls` sent after `content`: as one delta with it, each comes after all of it."""
    return tuple(replace(call, after=call.after + len(content)) for call in calls)
