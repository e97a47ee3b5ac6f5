"""Incremental Server-Sent Events parser: bytes from the network in, complete events out."""

from __future__ import annotations

from dataclasses import dataclass

# The stream payload OpenAI-compatible servers send last.
DONE_SENTINEL = "[DONE]"


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event: its `data:` lines joined by newlines, and its `event:` name if any."""

    data: str
    # The `event:` field; "" when the server sent none (the OpenAI default).
    event: str = ""


class SSEParser:
    """Splits a byte stream into SSE events, whatever the network chunking.

    Follows the WHATWG event-stream rules that matter for LLM servers: lines end in LF, CRLF or CR;
    a blank line dispatches the pending event; lines starting with ':' are comments (keep-alives);
    several `data:` lines join with '\\n'; an event with no data line is not dispatched. One departure:
    an `error:` line (llama.cpp's way of reporting a failure) is an event named "error".
    Bytes after the last blank line stay pending until more arrive (see `pending_bytes`).
    """

    def __init__(self) -> None:
        self._buffer = b""
        # A CR ending the previous feed may be half of a CRLF split across reads.
        self._skip_leading_lf = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Adds bytes from the network and returns the events they complete, in order."""
        if not chunk:
            return []
        if self._skip_leading_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_leading_lf = False
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            self._skip_leading_lf = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # After normalizing, "\n\n" always ends an event block: a line end, then a blank line.
        *blocks, self._buffer = buffer.split(b"\n\n")
        events: list[SSEEvent] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                # The common case (one data line, as OpenAI-compatible servers send): no line parsing.
                events.append(SSEEvent(block[6:].decode("utf-8", errors="replace")))
            else:
                event = _parse_block(block.decode("utf-8", errors="replace"))
                if event is not None:
                    events.append(event)
        return events

    def finish(self) -> list[SSEEvent]:
        """The body ended: the event its last lines started, when no blank line followed them (a
        final `data: [DONE]\n` is the common case). The WHATWG rules drop it, but the OpenAI SDK and
        every line-reading client take it, so a server that ends that way did send its last event."""
        block, self._buffer = self._buffer, b""
        self._skip_leading_lf = False
        if not block.strip():
            return []
        event = _parse_block(block.decode("utf-8", errors="replace"))
        return [event] if event is not None else []

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event not yet terminated by a blank line (non-zero at EOF = truncated)."""
        return len(self._buffer)


def _parse_block(block: str) -> SSEEvent | None:
    """One event's lines (no blank line inside, though one may lead) into an event, or None."""
    data_lines: list[str] = []
    error_lines: list[str] = []
    event_name = ""
    for line in block.split("\n"):
        if not line or line.startswith(":"):
            continue  # a leading blank line dispatches nothing; ':' lines are keep-alive comments
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event_name = value
        elif name == "error":
            error_lines.append(value)
        # "id" and "retry" only matter for reconnecting browsers; unknown fields are ignored per spec.
    if error_lines:
        # llama.cpp's llama-server (builds to mid-2025) reports a failure as an `error: {...}` line, a
        # field the rules ignore, then ends with data: [DONE]: dropped, the request would pass as done.
        return SSEEvent(data="\n".join(error_lines), event="error")
    if not data_lines:
        return None
    return SSEEvent(data="\n".join(data_lines), event=event_name)
