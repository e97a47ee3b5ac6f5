"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3 tokenizers), or the newer
`[TOOL_CALLS]name[ARGS]{...}` once per call. `[TOOL_CALLS]` is a special token, so the detokenizer
keeps special tokens in the text while this parser reads it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchlm.server.tools.calls import random_alphanumerics
from batchlm.server.tools.json_scan import skip_whitespace, value_end
from batchlm.server.tools.parser import ToolParser
from batchlm.server.tools.scan import CallScan, Scan, ScanBuilder, scan_call_array

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
ARGUMENT_KEYS = ("arguments", "parameters")
_NAME = re.compile(r"[A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class _Region:
    calls: list[CallScan]
    end: int | None


class MistralParser(ToolParser):
    keeps_special_tokens = True

    def new_id(self) -> str:
        """Mistral's chat templates refuse history whose call ids are not 9 alphanumerics."""
        return random_alphanumerics(9)

    def scan(self, text: str, final: bool) -> Scan:
        builder = ScanBuilder(final)
        pos = 0
        while (at := text.find(MARKER, pos)) >= 0:
            region = _region(text, skip_whitespace(text, at + len(MARKER)), final)
            if region is None:
                builder.verbatim(text[pos:])
                return builder.build()
            builder.text_before_call(text[pos:at])
            for call in region.calls:
                builder.call(call)
            if region.end is None:
                return builder.build()
            pos = region.end
        builder.tail(text[pos:], (MARKER,))
        return builder.build()


def _region(text: str, pos: int, final: bool) -> _Region | None:
    if pos >= len(text):
        return None if final else _Region([], None)
    if text[pos] == "[" and not text.startswith(ARGS, pos):
        array = scan_call_array(text, pos, final, ARGUMENT_KEYS)
        return None if array is None else _Region(array.calls, array.end)
    return _named_call(text, pos, final)


def _named_call(text: str, pos: int, final: bool) -> _Region | None:
    """`name[ARGS]{...}`."""
    name_end = _NAME.match(text, pos)
    assert name_end is not None
    after_name = name_end.end()
    rest = text[after_name:]
    if not text.startswith(ARGS, after_name):
        return None if final or not ARGS.startswith(rest) else _Region([], None)
    name = text[pos:after_name]
    start = skip_whitespace(text, after_name + len(ARGS))
    if not name or (start < len(text) and text[start] != "{"):
        return None
    end = value_end(text, start, final)
    if end is None and final:
        return None
    arguments = text[start:end] if end is not None else text[start:]
    return _Region([CallScan(name, arguments, end is not None)], end)
