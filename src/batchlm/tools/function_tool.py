"""A function a request offers as a tool, as the tools package reads it, and the schemas its calls are
decoded under."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from batchlm.tools.closed_schema import closed_objects

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

    def call_schema(self, argument_key: str, forced: bool = False) -> dict[str, Any]:
        """One call of this function as the JSON object a model writes: its name, and under
        `argument_key` its arguments (their schema when the call is forced, else chosen_arguments)."""
        arguments = self.closed_parameters if forced else self.chosen_arguments()
        return {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [self.name]}, argument_key: arguments},
            "required": ["name", argument_key],
            # Without this a small model may keep adding keys until max_tokens.
            "additionalProperties": False,
        }

    def chosen_arguments(self) -> dict[str, Any]:
        """The arguments of a call the model chose to make: their schema if strict, else any object."""
        return self.closed_parameters if self.strict else ANY_OBJECT

    @cached_property
    def closed_parameters(self) -> dict[str, Any]:
        """The schema a forced or strict call's arguments are decoded under (its objects closed)."""
        # Built once per tool: a strict request validates it, then writes it into one or more grammars.
        return closed_objects(self.parameters) if self.parameters is not None else NO_PARAMETERS


def calls_array_schema(
    tools: Sequence[FunctionTool], argument_key: str, max_items: int | None, forced: bool = False
) -> dict[str, Any]:
    """A non-empty JSON array of calls of `tools` (at most max_items), each FunctionTool.call_schema."""
    calls = [tool.call_schema(argument_key, forced) for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema
