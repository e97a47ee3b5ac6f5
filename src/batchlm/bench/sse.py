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
    several `data:` lines join with '\\n'; an event with no data line is not dispatched.
    Bytes after the last blank line stay pending until more arrive (see `pending_bytes`).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data_lines: list[str] = []
        self._event_name = ""
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
        *lines, self._buffer = buffer.split(b"\n")
        events: list[SSEEvent] = []
        for raw_line in lines:
            event = self._process_line(raw_line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event not yet terminated by a blank line (non-zero at EOF = truncated)."""
        pending_lines = sum(len(line) + 1 for line in self._data_lines)
        return len(self._buffer) + pending_lines

    def _process_line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment: servers send these as keep-alives
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._event_name = value
        # "id" and "retry" only matter for reconnecting browsers; unknown fields are ignored per spec.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data_lines:
            self._event_name = ""
            return None
        event = SSEEvent(data="\n".join(self._data_lines), event=self._event_name)
        self._data_lines = []
        self._event_name = ""
        return event
