"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of
them, with text before, between and after."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.server.tools.json_scan import scan_object, skip_whitespace
from batchlm.server.tools.parser import ToolParser
from batchlm.server.tools.scan import CallScan, Scan, ScanBuilder, call_from_object

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class _Region:
    call: CallScan | None
    # Just past the closing tag (or past the object when the tag is left out); None while arriving.
    end: int | None


class HermesParser(ToolParser):
    def scan(self, text: str, final: bool) -> Scan:
        builder = ScanBuilder(final)
        pos = 0
        while (at := text.find(START, pos)) >= 0:
            region = _region(text, at + len(START), final)
            if region is None:  # not a call after all: the rest is text
                builder.verbatim(text[pos:])
                return builder.build()
            builder.text_before_call(text[pos:at])
            if region.call is not None:
                builder.call(region.call)
            if region.end is None:
                return builder.build()
            pos = region.end
        builder.tail(text[pos:], (START,))
        return builder.build()


def _region(text: str, pos: int, final: bool) -> _Region | None:
    pos = skip_whitespace(text, pos)
    if pos >= len(text):
        return None if final else _Region(None, None)
    if text[pos] != "{":
        return None
    scan = scan_object(text, pos, final)
    call = call_from_object(text, scan, ARGUMENT_KEYS)
    if call is None or (final and scan.end is None):
        return None
    if scan.end is None:
        return _Region(call, None)
    after = skip_whitespace(text, scan.end)
    if text.startswith(END, after):
        return _Region(call, after + len(END))
    if not final and END.startswith(text[after:]):
        return _Region(call, None)
    # Models sometimes leave the closing tag out; what follows the object is text again.
    return _Region(call, scan.end)
