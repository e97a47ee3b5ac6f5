"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of
them, with text before, between and after."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from batchlm.tools.call_grammar import BLANK, calls_json, marked_calls_start, token_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import scan_object, skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import MarkedRegion, Scan, call_from_object, scan_marked_calls

START, END = "<tool_call>", "</tool_call>"
NEWLINE = json.dumps("\n")  # a Lark string literal
ARGUMENT_KEYS = ("arguments", "parameters")


class HermesParser(ToolParser):
    markers = (START, END)

    def scan(self, text: str, final: bool) -> Scan:
        # Regions read closed or as no call stay so as the output grows: the scan's end is read on.
        return scan_marked_calls(text, START, _region, final, read_on=True)

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """Free text (or `answer`); from a `<tool_call>` on, one call of the tools and its `</tool_call>`.
        Where the markers are tokens of the tokenizer (Qwen's), the grammar names those tokens and the
        text may not spell a marker out; otherwise the text before a call ends at its first marker."""
        head = marked_calls_start(
            (START, END), added_tokens, self.max_calls, answer, self._calls_alone(added_tokens)
        )
        return "\n".join([*head, _call_rule(tools, forced=False), BLANK])

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        """The calls alone, laid out as chat templates render them (Qwen's, the generic tools prompt):
        `<tool_call>`, a newline, the call, a newline, `</tool_call>`; calls a newline apart."""
        start, end = token_rule(START, added_tokens), token_rule(END, added_tokens)
        block = f"{start or json.dumps(START)} {NEWLINE} call {NEWLINE} {end or json.dumps(END)}"
        calls = "block" if self.max_calls == 1 else f"block ({NEWLINE} block)*"
        call = f"call: {calls_json(tools, ARGUMENT_KEYS[0], forced=True)}"
        return "\n".join([f"start: {calls}", f"block: {block}", call])

    def _calls_alone(self, added_tokens: Mapping[str, int]) -> str:
        """A Lark rule body: the output's calls, each in its markers, with no text around them."""
        start, end = token_rule(START, added_tokens), token_rule(END, added_tokens)
        opened = f"{start or json.dumps(START)} call {end or json.dumps(END)} BLANK"
        return opened if self.max_calls == 1 else f"({opened})+"


def _call_rule(tools: Sequence[FunctionTool], forced: bool) -> str:
    return f"call: BLANK {calls_json(tools, ARGUMENT_KEYS[0], forced)} BLANK"


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
