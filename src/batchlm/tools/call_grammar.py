"""Pieces of the Lark grammars (llguidance's) that hold a model's tool calls: its own marker tokens named
by id, free text that may hold the tokenizer's other added tokens, and the calls' JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from batchlm.tools.function_tool import FunctionTool

# A call's JSON as models write it (json.dumps' separators or compact), at most one space where JSON
# allows whitespace: a weak model cannot spend its budget on blanks.
CALL_JSON_FORMAT = {"whitespace_flexible": True, "whitespace_pattern": " ?"}
# Blanks around a call's markup, at most two: a weak model cannot spend its budget on them.
BLANK = "BLANK: /[ \\n]{0,2}/"


def token_rule(text: str, added_tokens: Mapping[str, int]) -> str | None:
    """A Lark reference to the tokenizer's own token for `text` (by id: names may hold brackets), or
    None when the tokenizer has no such token."""
    token_id = added_tokens.get(text)
    return None if token_id is None else f"<[{token_id}]>"


def calls_json(tools: Sequence[FunctionTool], argument_key: str, array_of: int | None = None) -> str:
    """A Lark `%json` nonterminal (llguidance's): one call of any of `tools`; with `array_of`, a JSON
    array of such calls (at least one, at most array_of where it is not 0)."""
    one: dict[str, Any] = {"anyOf": [tool.call_schema(argument_key) for tool in tools]}
    schema = one if array_of is None else {"type": "array", "items": one, "minItems": 1}
    if array_of:
        schema["maxItems"] = array_of
    return f"%json {json.dumps({**schema, 'x-guidance': CALL_JSON_FORMAT})}"


def arguments_json(tool: FunctionTool) -> str:
    """A Lark `%json` nonterminal: the arguments of a call of `tool` (their schema if it is strict)."""
    return f"%json {json.dumps({**tool.chosen_arguments(), 'x-guidance': CALL_JSON_FORMAT})}"


def free_text(added_tokens: Mapping[str, int], markers: Collection[str]) -> list[str]:
    """Rules for `free`: text that does not spell out the first marker, with the tokenizer's added tokens
    other than the markers between (a reasoning model's <think>, for one: text alone would refuse them)."""
    others = sorted(token_id for text, token_id in added_tokens.items() if text not in markers)
    opener = re.escape(next(iter(markers)))
    rules = [f"TEXT: /(?s:.+)/ & ~/(?s:.*){opener}(?s:.*)/"]
    if not others:
        return ["free: TEXT?", *rules]
    # One text lexeme between tokens: two in a row could spell a marker out between them.
    return [f"free: TEXT? (<[{_id_ranges(others)}]> TEXT?)*", *rules]


def _id_ranges(ids: Sequence[int]) -> str:
    """Sorted token ids as llguidance's list of ranges: 3,4,5,9 -> "3-5,9"."""
    ranges: list[tuple[int, int]] = []
    for token_id in ids:
        if ranges and token_id == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], token_id)
        else:
            ranges.append((token_id, token_id))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
