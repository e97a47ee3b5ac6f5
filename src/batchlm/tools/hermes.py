"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of
them, with text before, between and after."""

from __future__ import annotations

from batchlm.tools.json_scan import scan_object, skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import MarkedRegion, Scan, call_from_object, scan_marked_calls

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


class HermesParser(ToolParser):
    def scan(self, text: str, final: bool) -> Scan:
        return scan_marked_calls(text, START, _region, final)


def _region(text: str, pos: int, final: bool) -> MarkedRegion | None:
    pos = skip_whitespace(text, pos)
    if pos >= len(text):
        return None if final else MarkedRegion([], None)
    if text[pos] != "{":
        return None
    scan = scan_object(text, pos, final)
    call = call_from_object(text, scan, ARGUMENT_KEYS)
    if call is None or (final and scan.end is None):
        return None
    if scan.end is None:
        return MarkedRegion([call], None)
    after = skip_whitespace(text, scan.end)
    if text.startswith(END, after):
        return MarkedRegion([call], after + len(END))
    if not final and END.startswith(text[after:]):
        return MarkedRegion([call], None)
    # Models sometimes leave the closing tag out; what follows the object is text again.
    return MarkedRegion([call], scan.end)
