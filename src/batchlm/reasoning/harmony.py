"""gpt-oss's thinking: the bodies of its analysis messages (tools/harmony.py reads the markup).

The reasoning parser reads the output's messages once: analysis bodies are the thinking; the bodies of
final and recipient-less commentary messages (a preamble the user may see) are the content, as text;
a call of a function is handed on in the content, in one canonical markup (`call_header`, its
arguments, `<|call|>` where the model closed it), for the `gpt_oss` tool parser to read; a message to
another recipient (gpt-oss's built-in browser or python tools, which this server does not run) is
neither. Markup that does not read as messages is content from there on, as written.

Bodies of one kind are a blank line apart. A whole output is read as a stream of it is: fed at once,
then finished (`split`), so the two cannot disagree."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from batchlm.reasoning.split import ReasoningDelta, ReasoningParser, ReasoningSplit, ThinkMarkers
from batchlm.tools.call_grammar import free_text, token_rule
from batchlm.tools.harmony import (
    CALL,
    CHANNEL,
    END,
    MARKERS,
    MESSAGE,
    PENDING,
    START,
    Header,
    body_end,
    call_header,
    read_header,
)
from batchlm.tools.scan import partial_marker_length

# What `--reasoning-parser` knows harmony by: an analysis message's opening and end. The markers are
# special tokens, kept in the text.
HARMONY = ThinkMarkers(f"{CHANNEL}analysis{MESSAGE}", END, special=True)
# Between two bodies of one kind (two analysis messages, or a preamble and the answer).
BODY_SEPARATOR = "\n\n"

# What a message's body is: thinking, content, a call's arguments (handed on), or nothing shown.
REASONING, CONTENT, CALL_ARGUMENTS, HIDDEN = "reasoning", "content", "call", "hidden"


def body_kind(header: Header) -> str:
    if header.function is not None:
        return CALL_ARGUMENTS
    if header.recipient is not None:
        return HIDDEN
    return REASONING if header.channel == "analysis" else CONTENT


class HarmonyReasoningParser(ReasoningParser):
    def __init__(self) -> None:
        super().__init__(HARMONY, keeps_special_tokens=True)

    def split(self, text: str, final: bool) -> ReasoningSplit:
        stream = HarmonyStream()
        read = stream.feed(text)
        rest = stream.finish() if final else ReasoningDelta("", "")
        reasoning = read.reasoning + rest.reasoning if stream.thinking_seen else None
        return ReasoningSplit(reasoning, read.content + rest.content)

    def stream(self) -> HarmonyStream:
        return HarmonyStream()

    def thinking_tokens(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int:
        """The tokens up to the end of the output's last analysis message (its terminator included):
        the shortest prefix whose text reaches it, found by halving; none without thinking."""
        stream = HarmonyStream()
        stream.feed(decode(token_ids))
        stream.finish()
        if not stream.thinking_seen:
            return 0
        low, high = 0, len(token_ids)
        while high - low > 1:
            middle = (low + high) // 2
            if len(decode(token_ids[:middle])) >= stream.thinking_end:
                high = middle
            else:
                low = middle
        return high

    def _preamble(self, added_tokens: Mapping[str, int]) -> str:
        """Lark rules for what comes before a constrained answer: analysis messages, each free text up
        to its `<|end|>` and followed by the next message's start, then the final message's header (the
        constraint holds on its body)."""

        def marker(text: str) -> str:
            return token_rule(text, added_tokens) or json.dumps(text)

        channel, message = marker(CHANNEL), marker(MESSAGE)
        analysis = f'{channel} "analysis" {message} free {marker(END)} {marker(START)} "assistant"'
        rule = f'preamble: ({analysis})* {channel} "final" {message}'
        # The thinking's text may not hold a marker token, nor spell one out (the text is read).
        return "\n".join([rule, *free_text(added_tokens, MARKERS, unspelled=MARKERS)])


class HarmonyStream:
    """Fed an output's text deltas; answers the thinking and the content each one settles. A body is
    read on from where the last delta left it (a marker's beginning held back), so a delta costs the
    same however long the output grows; only a header is read again until it completes."""

    def __init__(self) -> None:
        self._text = ""
        # Where the text not yet read begins: a header's start, or a body's part not yet sent.
        self._pos = 0
        # The kind of the body being read; None between messages.
        self._kind: str | None = None
        # The markup broke: the rest of the output is content, as written.
        self._raw = False
        self._first = True
        # Per kind: whether a body of it sent text (the next one is a blank line apart); whether the
        # body being read has.
        self._seen = {REASONING: False, CONTENT: False}
        self._body_sent = False
        # An analysis message was read, and where the last one ends (its terminator included).
        self.thinking_seen = False
        self.thinking_end = 0

    def feed(self, delta: str) -> ReasoningDelta:
        text = self._text
        self._text = ""  # the only reference left is `text`: the += below extends it in place
        text += delta
        self._text = text
        return self._read(final=False)

    def finish(self) -> ReasoningDelta:
        return self._read(final=True)

    def _read(self, final: bool) -> ReasoningDelta:
        reasoning: list[str] = []
        content: list[str] = []
        text = self._text
        while self._pos < len(text) or (final and self._kind is not None):
            if self._raw:
                content.append(text[self._pos :])
                self._pos = len(text)
            elif self._kind is None:
                header = read_header(text, self._pos, final, bare=self._first)
                if header == PENDING:
                    break
                if not isinstance(header, Header):
                    self._raw = True
                    continue
                self._open(header, content)
            elif not self._read_body(final, reasoning, content):
                break
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _open(self, header: Header, content: list[str]) -> None:
        self._first, self._body_sent = False, False
        self._kind = body_kind(header)
        if self._kind == REASONING:
            self.thinking_seen = True
        if header.function is not None:
            content.append(call_header(header.function))
        self._pos = header.body_at

    def _read_body(self, final: bool, reasoning: list[str], content: list[str]) -> bool:
        """Reads the body on; whether it ended (the next message may follow)."""
        text, pos, kind = self._text, self._pos, self._kind
        end = body_end(text, pos)
        if end is None:
            stop = len(text) if final else len(text) - partial_marker_length(text[pos:], MARKERS)
            self._send(text[pos:stop], reasoning, content)
            self._pos = stop
            if final:
                self._close(stop)
            return final
        self._send(text[pos : end.at], reasoning, content)
        if end.broken:
            self._raw, self._kind, self._pos = True, None, end.at
            return True
        if kind == CALL_ARGUMENTS:
            content.append(CALL)
        self._close(end.next_at)
        self._pos = end.next_at
        return True

    def _close(self, end: int) -> None:
        if self._kind == REASONING:
            self.thinking_end = end
        self._kind = None

    def _send(self, piece: str, reasoning: list[str], content: list[str]) -> None:
        kind = self._kind
        if not piece or kind == HIDDEN:
            return
        if kind == CALL_ARGUMENTS:
            content.append(piece)
            return
        assert kind is not None
        out = reasoning if kind == REASONING else content
        if not self._body_sent and self._seen[kind]:
            out.append(BODY_SEPARATOR)
        self._seen[kind] = self._body_sent = True
        out.append(piece)
