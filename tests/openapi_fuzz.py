"""Hypothesis strategies for request bodies, built from the server's own OpenAPI schema (the subset of
JSON Schema that pydantic emits: $ref, anyOf, objects, arrays, scalars). Every leaf may also take a
hostile value (lone surrogates, NaN, infinities, huge or negative numbers, wrong types), so the bodies
range from valid requests to every kind of invalid one."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# "[" * 1500: JSON text nested past Python's reader, for the fields that hold JSON as text.
HOSTILE_STRINGS = [
    "\ud800x\udfff",
    "\udfff",
    "",
    "\x00",
    "x" * 3000,
    "[" * 1500,
    "{{ raise('x') }}",
    "default",
]
HOSTILE_NUMBERS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, -0.0, 2**64, -(2**63)]
HOSTILE_INTEGERS = [-1, 0, 1, 2**31, 2**63, 10**30, -(10**30)]
# Names whose realistic values random text would almost never hit.
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "function", "bot"]),
    "type": st.sampled_from(["text", "image_url", "input_audio"]),
    "model": st.sampled_from(["fake-model", "default", "other-model"]),
}

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def from_openapi(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of `schema` (a property schema or a $ref into `components`), hostile ones included."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return st.deferred(lambda: from_openapi(components[name], components))
    if "anyOf" in schema:
        return st.one_of([from_openapi(option, components) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema, components)
    if kind == "array":
        items = from_openapi(schema.get("items", {}), components)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=3) | st.just([])
    scalars: dict[str | None, st.SearchStrategy[Any]] = {
        "string": st.text(max_size=12) | st.sampled_from(HOSTILE_STRINGS),
        "integer": st.integers(-5, 70) | st.sampled_from(HOSTILE_INTEGERS),
        "number": st.floats(-3, 3) | st.sampled_from(HOSTILE_NUMBERS),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    leaf = scalars.get(kind, json_values)
    return leaf | json_values if kind is not None else leaf


def _object(schema: dict[str, Any], components: dict[str, Any]) -> st.SearchStrategy[Any]:
    properties = schema.get("properties")
    if not properties:
        return st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["type", "text"]), json_values, max_size=3
        )

    def field(name: str, spec: dict[str, Any]) -> st.SearchStrategy[Any]:
        values = from_openapi(spec, components)
        return HINTS[name] | values if name in HINTS else values

    required = {name: field(name, properties[name]) for name in schema.get("required", [])}
    optional = {name: field(name, spec) for name, spec in properties.items() if name not in required}
    return st.fixed_dictionaries(required, optional=optional)


def request_bodies(openapi: dict[str, Any], path: str, valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Bodies for POST `path`: the `valid` body with up to three fields set to generated values (a field
    drawn at random is usually wrong, so a body generated whole is rarely served), a body generated
    whole from the schema, or any JSON value at all."""
    body_schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    components = openapi["components"]["schemas"]
    properties = components[body_schema["$ref"].rsplit("/", 1)[-1]]["properties"]

    def with_fields(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
        fields = {name: from_openapi(properties[name], components) for name in names}
        return st.fixed_dictionaries(fields).map(lambda changed: {**valid, **changed})

    mutated = st.lists(st.sampled_from(sorted(properties)), max_size=3, unique=True).flatmap(with_fields)
    return mutated | from_openapi(body_schema, components) | json_values
