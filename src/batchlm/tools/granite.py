"""Granite 3.x: `<|tool_call|>[{"name": ..., "arguments": {...}}, ...]`, the calls as one JSON array after
the `<|tool_call|>` token (its chat templates ask for "<|tool_call|> followed by a JSON list of tools
used"). The marker is a special token of Granite's tokenizer, so the detokenizer keeps special tokens in
the text where the tokenizer hides it (`markers`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from batchlm.tools.call_grammar import BLANK, calls_array_json, free_text, token_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import MarkedRegion, Scan, scan_call_array, scan_marked_calls

MARKER = "<|tool_call|>"
ARGUMENT_KEYS = ("arguments", "parameters")


class GraniteParser(ToolParser):
    markers = (MARKER,)

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """Text (or `answer`), then optionally the marker and one array of calls, which end the output
        (the template asks for the calls alone). The text may not spell the marker out. None for a
        tokenizer without the marker's token."""
        marker = token_rule(MARKER, added_tokens)
        if marker is None:
            return None
        rules = self._call_rules(tools, forced=False)
        if answer is not None:
            return "\n".join([f"start: answer | {marker} calls", f"answer: {answer}", *rules])
        return "\n".join([f"start: free ({marker} calls)?", *free_text(added_tokens, (MARKER,)), *rules])

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        """The marker and the array of calls alone, the JSON laid out with json.dumps' separators, as
        Granite's calls are written (`<|tool_call|>[{"name": "f", "arguments": {"a": 1}}]`)."""
        marker = token_rule(MARKER, added_tokens)
        if marker is None:
            return None
        return "\n".join([f"start: {marker} calls", *self._call_rules(tools, forced=True)])

    def _call_rules(self, tools: Sequence[FunctionTool], forced: bool) -> list[str]:
        array = calls_array_json(tools, ARGUMENT_KEYS[0], self.max_calls, forced)
        return [f"calls: BLANK {array}", BLANK]

    def scan(self, text: str, final: bool) -> Scan:
        # Regions read closed or as no call stay so as the output grows: the scan's end is read on.
        return scan_marked_calls(text, MARKER, _region, final, read_on=True)


def _region(text: str, pos: int, final: bool) -> MarkedRegion | None:
    """The array of calls after a marker; None where something else follows it (the rest is text)."""
    pos = skip_whitespace(text, pos)
    if pos >= len(text):
        return None if final else MarkedRegion([], None)
    if text[pos] != "[":
        return None
    return scan_call_array(text, pos, final, ARGUMENT_KEYS)
