"""Outputs decoded under a forced tool choice. A named function: the output is its arguments object.
`required`: a JSON array of {"name": ..., "parameters": {...}} (the schema `tools.spec` builds)."""

from __future__ import annotations

from batchlm.tools.json_scan import raw_decode, skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import CallScan, Scan, ScanBuilder, scan_call_array

ARGUMENT_KEYS = ("parameters", "arguments")


class NamedFunctionParser(ToolParser):
    """The call is announced before any output; the output streams as its arguments."""

    def __init__(self, name: str) -> None:
        super().__init__(max_calls=1)
        self.name = name

    def scan(self, text: str, final: bool) -> Scan:
        arguments = text.strip()
        if final and not _is_json_object(arguments):
            return Scan(text)
        return Scan("", [CallScan(self.name, arguments, final)])


class RequiredCallsParser(ToolParser):
    def scan(self, text: str, final: bool) -> Scan:
        builder = ScanBuilder(final)
        pos = skip_whitespace(text, 0)
        if pos >= len(text) and not final:
            return builder.build()
        array = scan_call_array(text, pos, final, ARGUMENT_KEYS) if text.startswith("[", pos) else None
        if array is None or not array.calls:
            if final or array is None:
                builder.text(text)
            return builder.build()
        for call in array.calls:
            builder.call(call)
        if array.end is not None:
            builder.tail(text[array.end :], ())
        return builder.build()


def _is_json_object(text: str) -> bool:
    """Whether `text` (stripped) is one JSON object, its integers of any length."""
    try:
        value, end = raw_decode(text, 0)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's reader
        return False
    return isinstance(value, dict) and end == len(text)
