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
        `argument_key` its arguments (their schema when the call is forced, else chosen_arguments).
        Arguments whose schema refers into itself ($ref "#/$defs/...", as pydantic writes a nested
        model) refer to their place in the root's `$defs` instead (root_defs), where a schema that
        holds this call schema must put them: a pointer is read from the root of the whole schema."""
        arguments = self._arguments(forced)
        if _has_local_refs(arguments):
            arguments = {"$ref": self._defs_pointer}
        return {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [self.name]}, argument_key: arguments},
            "required": ["name", argument_key],
            # Without this a small model may keep adding keys until max_tokens.
            "additionalProperties": False,
        }

    def root_defs(self, forced: bool = False) -> dict[str, Any]:
        """What call_schema's arguments refer to, for the root's `$defs`: the arguments' schema under
        this function's key, its own pointers made to start there (none when it has none)."""
        arguments = self._arguments(forced)
        if not _has_local_refs(arguments):
            return {}
        return {self._defs_key: _refs_moved(arguments, self._defs_pointer)}

    def _arguments(self, forced: bool) -> dict[str, Any]:
        return self.closed_parameters if forced else self.chosen_arguments()

    @property
    def _defs_key(self) -> str:
        # Function names are letters, digits, "_" and "-" (tools.spec): safe in a JSON pointer as they are.
        return f"batchlm-arguments-{self.name}"

    @property
    def _defs_pointer(self) -> str:
        return f"#/$defs/{self._defs_key}"

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
    return with_root_defs(schema, tools, forced)


def calls_schema(tools: Sequence[FunctionTool], argument_key: str, forced: bool = False) -> dict[str, Any]:
    """One call of any of `tools` (FunctionTool.call_schema)."""
    schema = {"anyOf": [tool.call_schema(argument_key, forced) for tool in tools]}
    return with_root_defs(schema, tools, forced)


def with_root_defs(schema: dict[str, Any], tools: Sequence[FunctionTool], forced: bool) -> dict[str, Any]:
    """`schema`, a root that holds calls of `tools`, with the `$defs` their arguments refer to."""
    defs: dict[str, Any] = {}
    for tool in tools:
        defs.update(tool.root_defs(forced))
    return {"$defs": defs, **schema} if defs else schema


# Keywords whose values are data, not schemas: a "$ref" key inside them is no reference.
_DATA_KEYWORDS = ("enum", "const", "default", "examples")


def _has_local_refs(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_has_local_refs(member) for member in schema)
    if not isinstance(schema, dict):
        return False
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        return True
    return any(_has_local_refs(value) for key, value in schema.items() if key not in _DATA_KEYWORDS)


def _refs_moved(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local pointers ("#", "#/...") start at `base` instead of the root."""
    if isinstance(schema, list):
        return [_refs_moved(member, base) for member in schema]
    if not isinstance(schema, dict):
        return schema
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            moved[key] = base if value in ("#", "#/") else base + value[1:]
        elif key in _DATA_KEYWORDS:
            moved[key] = value
        else:
            moved[key] = _refs_moved(value, base)
    return moved
