"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3 tokenizers), or the newer
`[TOOL_CALLS]name[ARGS]{...}` once per call. `[TOOL_CALLS]` is a special token, so the detokenizer
keeps special tokens in the text while this parser reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from batchlm.tools.call_grammar import BLANK, arguments_json, calls_array_json, free_text, token_rule
from batchlm.tools.calls import random_alphanumerics
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import is_json_prefix, json_cursor, skip_whitespace, value_end
from batchlm.tools.parser import ToolParser, optional_calls
from batchlm.tools.scan import CallScan, MarkedRegion, Scan, scan_call_array, scan_marked_calls

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"
ARGUMENT_KEYS = ("arguments", "parameters")
_NAME = re.compile(r"[A-Za-z0-9_.-]*")


class MistralParser(ToolParser):
    keeps_special_tokens = True

    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """Text (or `answer`), then the calls in the form the tokenizer's tokens say:
        `[TOOL_CALLS]name[ARGS]{...}` per call where `[ARGS]` is a token, else one `[TOOL_CALLS]` and an
        array of calls. The text may not spell the marker out. None for a tokenizer without the marker."""
        marker = token_rule(MARKER, added_tokens)
        if marker is None:
            return None
        rules = self._call_rules(tools, added_tokens, forced=False)
        if answer is not None:
            return "\n".join(
                [f"start: answer | {self._calls_alone(added_tokens)}", f"answer: {answer}", *rules]
            )
        if token_rule(ARGS, added_tokens) is None:
            after_text = f"({marker} calls)?"
        else:
            after_text = f"({marker} call){optional_calls(self.max_calls)}"
        return "\n".join([f"start: free {after_text}", *free_text(added_tokens, (MARKER, ARGS)), *rules])

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        if token_rule(MARKER, added_tokens) is None:
            return None
        rules = self._call_rules(tools, added_tokens, forced=True)
        return "\n".join([f"start: {self._calls_alone(added_tokens)}", *rules])

    def _calls_alone(self, added_tokens: Mapping[str, int]) -> str:
        """A Lark rule body: the output's calls alone (the tokenizer has the marker)."""
        marker = token_rule(MARKER, added_tokens)
        if token_rule(ARGS, added_tokens) is None:
            return f"{marker} calls"
        return f"{marker} call" if self.max_calls == 1 else f"({marker} call)+"

    def _call_rules(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], forced: bool
    ) -> list[str]:
        """`calls` (an array after one marker) or `call` (`name[ARGS]{...}`), as the tokenizer has them."""
        args = token_rule(ARGS, added_tokens)
        if args is None:
            return [
                f"calls: BLANK {calls_array_json(tools, ARGUMENT_KEYS[0], self.max_calls, forced)}",
                BLANK,
            ]
        named = [
            f"call_{i}: {json.dumps(t.name)} {args} {arguments_json(t, forced)}" for i, t in enumerate(tools)
        ]
        return [f"call: {' | '.join(f'call_{i}' for i in range(len(tools)))}", *named]

    def new_id(self) -> str:
        """Mistral's chat templates refuse history whose call ids are not 9 alphanumerics."""
        return random_alphanumerics(9)

    def scan(self, text: str, final: bool) -> Scan:
        # Regions read closed or as no call stay so as the output grows: the scan's end is read on.
        return scan_marked_calls(text, MARKER, _region, final, read_on=True)


def _region(text: str, pos: int, final: bool) -> MarkedRegion | None:
    pos = skip_whitespace(text, pos)
    if pos >= len(text):
        return None if final else MarkedRegion([], None)
    if text[pos] == "[" and not text.startswith(ARGS, pos):
        return scan_call_array(text, pos, final, ARGUMENT_KEYS)
    return _named_call(text, pos, final)


def _named_call(text: str, pos: int, final: bool) -> MarkedRegion | None:
    """`name[ARGS]{...}`."""
    name_end = _NAME.match(text, pos)
    assert name_end is not None
    after_name = name_end.end()
    rest = text[after_name:]
    if not text.startswith(ARGS, after_name):
        return None if final or not ARGS.startswith(rest) else MarkedRegion([], None)
    name = text[pos:after_name]
    start = skip_whitespace(text, after_name + len(ARGS))
    if not name or (start < len(text) and text[start] != "{"):
        return None
    end = value_end(text, start, final)
    if end is not None:
        return MarkedRegion([CallScan(name, text[start:end], True)], end)
    if final or not is_json_prefix(text, start):
        return None
    # Carried on only once the object has begun (before it, a delta may still show it is none).
    cursor = json_cursor(text, start) if start < len(text) else None
    return MarkedRegion([CallScan(name, text[start:], False, cursor=cursor)], None)
