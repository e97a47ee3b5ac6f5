"""An assistant message read out of a model's output: the thinking first (a reasoning parser), then the
tool calls in what follows it (a tool parser), for a whole output or a stream of it."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.reasoning.split import ReasoningParser, ThinkingStream
from batchlm.tools.calls import ParsedMessage, StreamDelta, ToolCall, ToolCallDelta, calls_after
from batchlm.tools.parser import ToolCallStream, ToolParser


@dataclass(frozen=True)
class AssistantMessage:
    reasoning: str | None
    # None when the message holds only thinking or calls.
    content: str | None
    tool_calls: tuple[ToolCall, ...]
    # The output ended inside its last call (see ParsedMessage).
    call_cut_off: bool = False

    @property
    def ends_in_calls(self) -> bool:
        """Whether it finishes with "tool_calls": it made calls, none of them cut off."""
        return bool(self.tool_calls) and not self.call_cut_off


@dataclass(frozen=True)
class MessageDelta:
    reasoning: str
    content: str
    tool_calls: tuple[ToolCallDelta, ...]

    def then(self, later: MessageDelta) -> MessageDelta:
        """This delta and a later one as one: the later one's calls after this one's content."""
        return MessageDelta(
            self.reasoning + later.reasoning,
            self.content + later.content,
            self.tool_calls + calls_after(later.tool_calls, self.content),
        )


class MessageReader:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def read(self, text: str, cut_short: bool = False) -> AssistantMessage:
        """cut_short: max_tokens or a stop string ended the output (see ToolParser.extract)."""
        reasoning = None
        if self.reasoning is not None:
            split = self.reasoning.split(text, final=True)
            reasoning, text = split.reasoning, split.content
        parsed = self.tools.extract(text, cut_short) if self.tools is not None else ParsedMessage(text, ())
        content = parsed.content if parsed.content or reasoning is None else None
        return AssistantMessage(reasoning, content, parsed.tool_calls, parsed.call_cut_off)

    def stream(self) -> MessageStream:
        return MessageStream(self)


class MessageStream:
    """Fed an output's text deltas; answers the thinking, content and call pieces each one settles."""

    def __init__(self, reader: MessageReader) -> None:
        self._reasoning: ThinkingStream | None = None
        self._tools: ToolCallStream | None = None
        if reader.reasoning is not None:
            self._reasoning = reader.reasoning.stream()
        if reader.tools is not None:
            self._tools = reader.tools.stream()

    @property
    def ends_in_calls(self) -> bool:
        return self._tools is not None and self._tools.ends_in_calls

    def call_reads(self, index: int) -> bool:
        """Whether the call sent with this index reads as one so far (ToolCallStream.call_reads)."""
        return self._tools is not None and self._tools.call_reads(index)

    def feed(self, delta: str) -> MessageDelta:
        reasoning = ""
        if self._reasoning is not None:
            piece = self._reasoning.feed(delta)
            reasoning, delta = piece.reasoning, piece.content
        settled = self._tools.feed(delta) if self._tools is not None else StreamDelta(delta, ())
        return MessageDelta(reasoning, settled.content, settled.tool_calls)

    def finish(self, cut_short: bool = False) -> MessageDelta:
        """The rest, once the output has ended (cut_short: see ToolCallStream.finish)."""
        reasoning, content = "", ""
        if self._reasoning is not None:
            piece = self._reasoning.finish()
            reasoning, content = piece.reasoning, piece.content
        if self._tools is None:
            return MessageDelta(reasoning, content, ())
        fed, rest = self._tools.feed(content), self._tools.finish(cut_short)
        return MessageDelta(reasoning, fed.content, fed.tool_calls).then(
            MessageDelta("", rest.content, rest.tool_calls)
        )
