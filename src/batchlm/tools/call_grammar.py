"""Pieces of the Lark grammars (llguidance's) that hold a model's tool calls: its own marker tokens named
by id, free text that may hold the tokenizer's other added tokens, and the calls' JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from batchlm.tools.function_tool import FunctionTool, calls_array_schema, calls_schema
from batchlm.tools.parser import optional_calls

# A call's JSON as models write it (json.dumps' separators or compact), at most one space where JSON
# allows whitespace: a weak model cannot spend its budget on blanks.
CALL_JSON_FORMAT = {"whitespace_flexible": True, "whitespace_pattern": " ?"}
# A forced call's JSON as chat templates render calls in history (Jinja's tojson, json.dumps' separators):
# what models are trained to write, and the next turn's prompt then repeats the sampled tokens.
RENDERED_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Blanks around a call's markup, at most two: a weak model cannot spend its budget on them.
BLANK = "BLANK: /[ \\n]{0,2}/"


def token_rule(text: str, added_tokens: Mapping[str, int]) -> str | None:
    """A Lark reference to the tokenizer's own token for `text` (by id: names may hold brackets), or
    None when the tokenizer has no such token."""
    token_id = added_tokens.get(text)
    return None if token_id is None else f"<[{token_id}]>"


def decoding_hides(
    markers: Iterable[str], added_tokens: Mapping[str, int], hidden_ids: Collection[int]
) -> bool:
    """Whether a text decoded without special tokens leaves one of `markers` out (an added token among
    `hidden_ids`): the detokenizer must then keep special tokens for the markers to be read."""
    return any(added_tokens.get(marker) in hidden_ids for marker in markers)


def calls_json(tools: Sequence[FunctionTool], argument_key: str, forced: bool = False) -> str:
    """A Lark `%json` nonterminal (llguidance's): one call of any of `tools` (FunctionTool.call_schema)."""
    return json_rule(calls_schema(tools, argument_key, forced), forced)


def calls_array_json(
    tools: Sequence[FunctionTool], argument_key: str, max_items: int | None, forced: bool = False
) -> str:
    """A Lark `%json` nonterminal: a non-empty JSON array of calls of `tools` (at most max_items)."""
    return json_rule(calls_array_schema(tools, argument_key, max_items, forced), forced)


def arguments_json(tool: FunctionTool, forced: bool = False) -> str:
    """A Lark `%json` nonterminal: the arguments of a call of `tool` (their schema if the call is forced
    or the function strict)."""
    return json_rule(tool.closed_parameters if forced else tool.chosen_arguments(), forced)


def free_text(
    added_tokens: Mapping[str, int], markers: Sequence[str], unspelled: Sequence[str] | None = None
) -> list[str]:
    """Rules for `free`: text that does not spell out the first marker (or any of `unspelled`), with the
    tokenizer's added tokens other than the markers between (a reasoning model's <think>, for one: text
    alone would refuse them)."""
    others = sorted(token_id for text, token_id in added_tokens.items() if text not in markers)
    # Lark ends a regex at an unescaped slash.
    spelled = [re.escape(m).replace("/", "\\/") for m in unspelled or markers[:1]]
    opener = spelled[0] if len(spelled) == 1 else f"(?:{'|'.join(spelled)})"
    rules = [f"TEXT: /(?s:.+)/ & ~/(?s:.*){opener}(?s:.*)/"]
    if not others:
        return ["free: TEXT?", *rules]
    # One text lexeme between tokens: two in a row could spell a marker out between them.
    return [f"free: TEXT? (<[{_id_ranges(others)}]> TEXT?)*", *rules]


def marked_calls_start(
    markers: tuple[str, str],
    added_tokens: Mapping[str, int],
    max_calls: int | None,
    answer: str | None,
    calls_alone: str,
) -> list[str]:
    """The `start` rule, and the rules it needs, of a family whose calls each sit between an opening
    and a closing marker (`<tool_call>` ... `</tool_call>`), what lies between them named `call`: free
    text with calls in it, or `answer` or else the calls alone (`calls_alone`, a rule body). Where the
    markers are tokens of the tokenizer, the grammar names them and the text may not spell one out;
    otherwise the text before a call ends at its first opening marker."""
    opening, closing = markers
    start, end = token_rule(opening, added_tokens), token_rule(closing, added_tokens)
    if answer is not None:
        return [f"start: answer | {calls_alone}", f"answer: {answer}"]
    if start is not None and end is not None:
        return [
            f"start: free ({start} call {end} free){optional_calls(max_calls)}",
            *free_text(added_tokens, markers),
        ]
    return [
        f"start: (call_head call {json.dumps(closing)}){optional_calls(max_calls)} TEXT",
        f"call_head[lazy]: TEXT {json.dumps(opening)}",
        "TEXT: /(.|\\n)*/",
    ]


def json_rule(schema: dict[str, Any], rendered: bool = False) -> str:
    """A Lark `%json` nonterminal for `schema`, in the calls' JSON format (rendered: a forced call's)."""
    form = RENDERED_JSON_FORMAT if rendered else CALL_JSON_FORMAT
    return f"%json {json.dumps({**schema, 'x-guidance': form})}"


def _id_ranges(ids: Sequence[int]) -> str:
    """Sorted token ids as llguidance's list of ranges: 3,4,5,9 -> "3-5,9"."""
    ranges: list[tuple[int, int]] = []
    for token_id in ids:
        if ranges and token_id == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], token_id)
        else:
            ranges.append((token_id, token_id))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
