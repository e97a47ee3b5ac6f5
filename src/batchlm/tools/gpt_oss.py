"""gpt-oss: a call is a harmony message to `functions.NAME` (tools/harmony.py), its body the arguments'
JSON: `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`, or with the
recipient in the header before the channel. `<|call|>` ends the generation, so a call may also end
with the output.

Behind the `gpt_oss` reasoning parser the text holds the visible messages' bodies as text and each
call in that markup; without it (`--reasoning-parser none`), the output as the model wrote it, whose
messages other than calls stay in the content as written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.harmony import CHANNEL, MARKERS, PENDING, START, TERMINATORS, Header, read_header
from batchlm.tools.harmony_grammar import harmony_grammar
from batchlm.tools.json_scan import json_cursor, scan_object, skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import CallScan, MarkedRegion, Scan, ScanBuilder

# Where a message's header may begin in the text.
OPENINGS = (START, CHANNEL)


class GptOssParser(ToolParser):
    keeps_special_tokens = True
    grammar_holds_thinking = True
    markers = MARKERS

    def scan(self, text: str, final: bool) -> Scan:
        builder = ScanBuilder(final)
        pos = search = 0
        while (at := _next_header(text, search)) >= 0:
            # Behind the reasoning parser a call opens with its channel, wherever it comes.
            header = read_header(text, at, final, bare=True)
            if header == PENDING:  # it may still open a call: held back
                builder.text(text[pos:at])
                return builder.build()
            if not isinstance(header, Header) or header.function is None:
                search = at + 1  # no call: the header is text
                continue
            region = _call(text, header, final)
            if region is None:  # not a call after all: the rest is text
                builder.text(text[pos:])
                return builder.build(builder.text_end(()))
            builder.text(text[pos:at])
            for call in region.calls:
                builder.call(call)
            if region.end is None:
                return builder.build()
            pos = search = region.end
        builder.tail(text[pos:], MARKERS)
        return builder.build(builder.text_end(MARKERS))

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """The whole output in harmony markup (tools/harmony_grammar.py): thinking and preambles, then the
        final message (free text, or `answer`) or one call of `tools`."""
        return harmony_grammar(tools, added_tokens, answer, forced=False)

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        """The thinking, then one call of `tools` in harmony markup: gpt-oss makes one call per output
        (`<|call|>` ends it), so `required` with parallel calls gets one too."""
        return harmony_grammar(tools, added_tokens, None, forced=True)


def _next_header(text: str, pos: int) -> int:
    """Where the next header may begin at or after `pos` (-1: nowhere); the output's first may open
    with its recipient."""
    if pos == 0 and text.startswith((" to=", "to=")):
        return 0
    found = [at for at in (text.find(opening, pos) for opening in OPENINGS) if at >= 0]
    return min(found, default=-1)


def _call(text: str, header: Header, final: bool) -> MarkedRegion | None:
    """The call whose header `header` is: its arguments' object, then a terminator (or the output's end,
    where the stop token ended it); None where the body is no such object."""
    assert header.function is not None
    pos = skip_whitespace(text, header.body_at)
    if pos >= len(text):
        return None if final else MarkedRegion([], None)
    if text[pos] != "{":
        return None
    scan = scan_object(text, pos, final)
    if scan.malformed or (final and scan.end is None):
        return None
    if scan.end is None:
        arguments = CallScan(header.function, text[pos:], False, cursor=json_cursor(text, pos))
        return MarkedRegion([arguments], None)
    call = CallScan(header.function, text[pos : scan.end], True)
    after = skip_whitespace(text, scan.end)
    terminator = next((t for t in TERMINATORS if text.startswith(t, after)), None)
    if terminator is not None:
        return MarkedRegion([call], after + len(terminator))
    if text.startswith(START, after) or (final and after == len(text)):
        return MarkedRegion([call], after)
    if not final and any(m.startswith(text[after:]) for m in (*TERMINATORS, START)):
        return MarkedRegion([call], None)
    return None
