"""The parser interface: a family scans an output into content and calls (`scan`); the same scan serves a
complete output (`extract`) and a stream (`ToolCallStream`), so the two cannot disagree."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from batchlm.tools.calls import ParsedMessage, StreamDelta, ToolCall, ToolCallDelta, new_call_id
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.scan import Scan


class ToolParser(ABC):
    # The family's call markers are special tokens, which the detokenizer must keep in the text.
    keeps_special_tokens = False
    # The markers the parser reads calls by: where a tokenizer has one as a special token (Granite
    # 4's `<tool_call>`), the detokenizer must keep special tokens too, or the calls read as text.
    markers: tuple[str, ...] = ()
    # The family's grammars hold the whole output, its thinking included (gpt-oss's harmony messages,
    # where the thinking is a message like the answer): a reasoning parser puts no preamble before them.
    grammar_holds_thinking = False

    def __init__(self, max_calls: int | None = None, tools: Sequence[FunctionTool] = ()) -> None:
        """tools: the request's functions, for a family whose markup needs their schemas to read a call
        (Qwen3-Coder's raw-text parameter values)."""
        # parallel_tool_calls=false keeps the first call only.
        self.max_calls = max_calls

    def new_id(self) -> str:
        return new_call_id()

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """A Lark grammar (llguidance's, with `%json`) under which text stays free but every call the
        model opens in this family's markup is a call of one of `tools`, its arguments fitting the
        schema of a strict one; max_calls bounds the calls. added_tokens: the tokenizer's added
        tokens by text (a marker among them is one token, named by its id in the grammar). answer:
        a Lark rule body (the client's response_format as `%json`) the output is instead of free text
        when it makes no call. None where the family has no such grammar."""
        return None

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        """A Lark grammar under which the output is calls alone, in this family's markup: at least one,
        at most max_calls, each of one of `tools` with arguments that fit its schema (a forced
        tool_choice). The model writes its calls as its chat template shows them, so that they read
        back into the next turn's prompt as written. None where the family has no such grammar."""
        return None

    @abstractmethod
    def scan(self, text: str, final: bool) -> Scan:
        """Content and calls of `text`, as far as they are settled (all of it when `final`)."""

    def extract(self, text: str, cut_short: bool = False) -> ParsedMessage:
        """A complete output's content and calls. Markup that does not parse stays in the content,
        unless the output was cut short (max_tokens, or one of the client's stop strings, ended it
        before the model did): then it is what a stream of it sends, a call cut off keeping its
        arguments as far as they got (as OpenAI answers it, with finish_reason "length")."""
        if cut_short:
            return self._as_streamed(text)
        scan = self.scan(text, final=True)
        calls = [ToolCall(self.new_id(), c.name, c.arguments) for c in scan.calls if c.name is not None]
        return ParsedMessage(scan.content or None, tuple(calls[: self.max_calls]))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def _as_streamed(self, text: str) -> ParsedMessage:
        stream = self.stream()
        pieces = (stream.feed(text), stream.finish(cut_short=True))
        calls: list[ToolCall] = []
        for piece in (call for delta in pieces for call in delta.tool_calls):
            if piece.id is not None:
                assert piece.name is not None
                calls.append(ToolCall(piece.id, piece.name, piece.arguments))
            else:
                last = calls[piece.index]
                calls[piece.index] = ToolCall(last.id, last.name, last.arguments + piece.arguments)
        content = "".join(delta.content for delta in pieces)
        return ParsedMessage(content or None, tuple(calls), call_cut_off=stream.call_cut_off)


class ToolCallStream:
    """Fed an output's text deltas; answers the content and call deltas each one settles. Text that may
    begin a call's markup is held back until it is known not to."""

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self._text = ""
        self._content_sent = 0
        self._ids: list[str] = []
        self._arguments_sent: list[int] = []
        # How many of the calls sent still read as calls: in the last scan, and once finished, whole.
        # Those after them stopped parsing, or the output ended inside them.
        self._reading = 0
        # Set by finish: the output was cut short inside a call it sent.
        self.call_cut_off = False
        self._scan: Scan | None = None

    @property
    def ends_in_calls(self) -> bool:
        """Whether the output made calls that read whole, none of them cut off (a finish_reason of
        "tool_calls"), as the whole reply's calls are. A call whose markup stopped parsing counts for
        nothing: no call of the whole reply, though a stream may have announced it (and cannot take
        it back)."""
        return self._reading > 0 and not self.call_cut_off

    def call_reads(self, index: int) -> bool:
        """Whether the call sent with this index reads as a call in the output so far (whole, once
        finished): False once its markup stopped parsing (the output shows it as content then), or
        when the output ended inside it."""
        return index < self._reading

    def feed(self, delta: str) -> StreamDelta:
        text = self._text
        self._text = ""  # the only reference left is `text`: the += below extends it in place
        text += delta
        self._text = text
        scan = self._scan.continued(delta) if self._scan is not None else None
        if scan is None:
            scan = self._parser.scan(self._text, final=False)
        self._scan = scan
        return self._difference(scan)

    def finish(self, cut_short: bool = False) -> StreamDelta:
        """The rest, once the output has ended. cut_short (max_tokens or a stop string ended it): what
        was held back stays unsent, since it may be markup cut off before it could be read as a call,
        and the calls are those the text read so far holds, the last cut off where it did not close.
        Otherwise the model ended it: markup that does not read as a call is content, as in `extract`.
        Either way the finish depends on the text alone, not on the deltas it came in."""
        scan = self._parser.scan(self._text, final=True)
        complete = self._calls_read(scan)
        if cut_short:
            # Settled on the scans of the whole text (`extract` feeds it at once), not on the calls
            # sent: one whose markup stopped parsing part way is no call either way. A call the last
            # scan of the text read (`_reading`) that does not read whole at its end was cut off:
            # what was sent of it stands.
            self.call_cut_off = complete < self._reading
            rest = StreamDelta("", ())
        else:
            rest = self._difference(scan)
        self._reading = min(self._reading, complete)
        return rest

    def _calls_read(self, scan: Scan) -> int:
        """How many calls of a scan a stream sends (as `_difference` counts them in `_reading`): the
        leading ones with their names, up to max_calls."""
        named = itertools.takewhile(lambda call: call.name is not None, scan.calls)
        return len(list(itertools.islice(named, self._parser.max_calls)))

    def _difference(self, scan: Scan) -> StreamDelta:
        sent = self._content_sent
        content = scan.content[sent:]
        self._content_sent = max(sent, len(scan.content))
        deltas: list[ToolCallDelta] = []
        self._reading = 0
        for index, call in enumerate(scan.calls[: self._parser.max_calls]):
            if call.name is None:
                break
            self._reading = index + 1
            # Where the call comes among the content this delta sends.
            after = min(max(scan.offsets[index] - sent, 0), len(content)) if index < len(scan.offsets) else 0
            if index == len(self._ids):
                self._ids.append(self._parser.new_id())
                self._arguments_sent.append(0)
                deltas.append(ToolCallDelta(index, self._ids[index], call.name, "", after))
            fragment = call.arguments[self._arguments_sent[index] :]
            if fragment:
                deltas.append(ToolCallDelta(index, None, None, fragment, after))
                self._arguments_sent[index] = len(call.arguments)
        return StreamDelta(content, tuple(deltas))


def optional_calls(max_calls: int | None) -> str:
    """How often a grammar's optional call may come: at most once, or any number of times."""
    return "?" if max_calls == 1 else "*"
