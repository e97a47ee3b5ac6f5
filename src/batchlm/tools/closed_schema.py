"""A forced call's arguments schema with its objects closed: an object schema that lists its properties
and says nothing of others gets `additionalProperties: false`, as xgrammar's strict mode and OpenAI's
strict function calling have it. Decoded under an open schema, a small model may keep
inventing keys until max_tokens, and a function gets arguments it never declared."""

from __future__ import annotations

from typing import Any

# Keywords whose value is one schema, a list of schemas, or a map of names to schemas.
_ONE_SCHEMA = ("items", "additionalItems", "additionalProperties", "not", "contains", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Beside any of these an object's other keys are spoken for (or come from elsewhere): it stays as it is.
# allOf's members are left whole, since closing one would refuse the keys another adds.
_OTHER_KEYS_SAID = (
    "additionalProperties",
    "unevaluatedProperties",
    "patternProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "$ref",
    "if",
    "dependentSchemas",
)


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` whose object schemas with `properties` allow no other keys unless they say so."""
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        members = closed.get(key)
        if isinstance(members, dict):
            closed[key] = {name: _closed_member(member) for name, member in members.items()}
    for key in _ONE_SCHEMA:
        member = closed.get(key)
        if isinstance(member, dict):
            closed[key] = closed_objects(member)
    for key in _SCHEMA_LISTS:
        members = closed.get(key)
        if isinstance(members, list):
            closed[key] = [_closed_member(member) for member in members]
    if _lists_only_its_properties(schema):
        closed["additionalProperties"] = False
    return closed


def _closed_member(member: Any) -> Any:
    return closed_objects(member) if isinstance(member, dict) else member


def _lists_only_its_properties(schema: dict[str, Any]) -> bool:
    if not isinstance(schema.get("properties"), dict) or any(key in schema for key in _OTHER_KEYS_SAID):
        return False
    kind = schema.get("type", "object")
    return kind == "object" or (isinstance(kind, list) and "object" in kind)
