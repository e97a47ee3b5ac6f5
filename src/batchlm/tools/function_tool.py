"""A function a request offers as a tool, as the tools package reads it, and the schemas its calls are
decoded under."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchlm.tools.closed_schema import closed_objects

# A call's JSON as models write it (json.dumps' separators or compact), at most one space where JSON
# allows whitespace: a weak model cannot spend its budget on blanks.
CALL_JSON_FORMAT = {"whitespace_flexible": True, "whitespace_pattern": " ?"}
# Blanks around a call's markup, at most two: a weak model cannot spend its budget on them.
BLANK = "BLANK: /[ \\n]{0,2}/"
# A function that is not strict takes whatever arguments object the model writes.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# OpenAI: a function without `parameters` takes none.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str | None
    # The arguments' JSON schema (an object schema); None: the function takes no arguments.
    parameters: dict[str, Any] | None
    # OpenAI's `strict`: its calls must fit `parameters`, also when the model chooses to call it.
    strict: bool = False

    def call_schema(self, argument_key: str) -> dict[str, Any]:
        """One call of this function as the JSON object a model writes: its name, and under
        `argument_key` its arguments."""
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, argument_key: self.chosen_arguments()},
            "required": ["name", argument_key],
            "additionalProperties": False,
        }

    def chosen_arguments(self) -> dict[str, Any]:
        """The arguments of a call the model chose to make: their schema if strict, else any object."""
        return arguments_schema(self) if self.strict else ANY_OBJECT


def arguments_schema(tool: FunctionTool) -> dict[str, Any]:
    """The schema a forced or strict call's arguments are decoded under (its objects closed)."""
    return closed_objects(tool.parameters) if tool.parameters is not None else NO_PARAMETERS


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
