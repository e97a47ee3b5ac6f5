"""Llama 3.1 / 3.2 JSON calls: the whole output is `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`. An output that starts otherwise is text."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from batchlm.tools.call_grammar import BLANK, calls_json, token_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.json_scan import scan_object, skip_whitespace
from batchlm.tools.parser import ToolParser
from batchlm.tools.scan import Scan, ScanBuilder, call_from_object

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonParser(ToolParser):
    def calls_grammar(
        self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None = None
    ) -> str | None:
        """Text that does not open with `{` (nor the tag), or `answer`; or the calls: `<|python_tag|>`
        first where the tokenizer has it as a token, then one call of the tools, or several joined by
        `;`. (An answer and a call both open with `{`: llguidance reads them as one JSON lexeme class.)"""
        calls = self._calls_alone(added_tokens)
        if answer is not None:
            first = [f"start: answer | {calls}", f"answer: {answer}"]
        else:
            first = [
                f"start: TEXT | {calls}",
                f"TEXT: /(?s:.*)/ & ~/\\s*(\\{{|{re.escape(PYTHON_TAG)})(?s:.*)/",
            ]
        return "\n".join([*first, f"call: {calls_json(tools, ARGUMENT_KEYS[0])}", BLANK])

    def forced_grammar(self, tools: Sequence[FunctionTool], added_tokens: Mapping[str, int]) -> str | None:
        rules = [
            f"start: {self._calls_alone(added_tokens)}",
            f"call: {calls_json(tools, ARGUMENT_KEYS[0], True)}",
        ]
        return "\n".join([*rules, BLANK])

    def _calls_alone(self, added_tokens: Mapping[str, int]) -> str:
        """A Lark rule body: the tag where the tokenizer has it as a token (optional), then the calls."""
        tag_token = token_rule(PYTHON_TAG, added_tokens)
        tag = f"{tag_token}? " if tag_token is not None else ""
        more = "" if self.max_calls == 1 else ' (";" BLANK call)*'
        return f"{tag}BLANK call{more} BLANK"

    def scan(self, text: str, final: bool) -> Scan:
        builder = ScanBuilder(final)
        pos = skip_whitespace(text, 0)
        if not final and PYTHON_TAG.startswith(text[pos:]):
            return builder.build()  # nothing yet, or the start of the tag
        if text.startswith(PYTHON_TAG, pos):
            pos = skip_whitespace(text, pos + len(PYTHON_TAG))
        if not text.startswith("{", pos):
            if not final and pos == len(text):
                return builder.build()  # only blanks after the tag yet
            builder.text(text)
            return _text_to_the_end(builder)
        return self._calls(text, pos, builder)

    def _calls(self, text: str, pos: int, builder: ScanBuilder) -> Scan:
        while True:
            scan = scan_object(text, pos, builder.final)
            call = call_from_object(text, scan, ARGUMENT_KEYS, arguments_required=True)
            if call is None or (builder.final and scan.end is None):
                builder.text(text if not builder.calls else text[pos:])
                return _text_to_the_end(builder)
            builder.call(call)
            if scan.end is None:
                return builder.build()
            after = skip_whitespace(text, scan.end)
            if not text.startswith(";", after):
                builder.tail(text[after:], ())
                return _text_to_the_end(builder)
            pos = skip_whitespace(text, after + 1)
            if pos >= len(text):
                return builder.build()
            if text[pos] != "{":
                builder.tail(text[after:], ())
                return _text_to_the_end(builder)


def _text_to_the_end(builder: ScanBuilder) -> Scan:
    """The scan of an output whose rest is text, whatever follows: what the text began with (no `{`
    nor the tag, a call that can never be JSON, no `;` after a call) is settled once it is there, so
    later text only extends the content (`Scan.end`)."""
    return builder.build(builder.text_end(()))
