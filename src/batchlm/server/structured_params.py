"""Edge mapping of `response_format`, `structured_outputs` and the `guided_*` fields onto one
StructuredOutputs; the input processor compiles it, so that a bad schema or grammar is a 400 naming it."""

from __future__ import annotations

import json
from typing import Any

from batchlm.sampling_params import SamplingParamsError, StructuredOutputs
from batchlm.server.errors import APIError
from batchlm.server.protocol import SamplingFields
from batchlm.structured.backend import GrammarError
from batchlm.structured.llguidance_backend import lark_from_user_grammar

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def structured_outputs_of(request: SamplingFields) -> tuple[str, StructuredOutputs] | None:
    """The field the client used and its constraint (None when there is none). 400 for a malformed or
    conflicting one; whether it compiles is the input processor's check."""
    found: list[tuple[str, StructuredOutputs]] = []
    response_format = getattr(request, "response_format", None)
    if response_format is not None:
        spec = _from_response_format(response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if request.structured_outputs is not None:
        fields = request.structured_outputs
        kinds = _kinds(fields.json_, fields.json_object, fields.regex, fields.choice, fields.grammar)
        found.append(("structured_outputs", _spec("structured_outputs", **kinds)))
    guided = _kinds(
        request.guided_json, None, request.guided_regex, request.guided_choice, request.guided_grammar
    )
    if guided:
        param = "guided_" + next(iter(guided)).removesuffix("_")
        found.append((param, _spec(param, **guided)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{param}'" for param, _ in found)
        raise APIError(400, f"Only one output constraint may be given; got {names}.", param=found[1][0])
    return found[0]


def _kinds(
    json_: Any, json_object: bool | None, regex: str | None, choice: Any, grammar: str | None
) -> dict[str, Any]:
    given = {"json_": json_, "json_object": json_object or None, "regex": regex, "choice": choice}
    given["grammar"] = grammar
    return {name: value for name, value in given.items() if value is not None}


def _spec(param: str, **kinds: Any) -> StructuredOutputs:
    if len(kinds) != 1:
        raise APIError(
            400,
            f"'{param}' must set exactly one of json, json_object, regex, choice or grammar.",
            param=param,
        )
    ((kind, value),) = kinds.items()
    try:
        if kind == "json_":
            return StructuredOutputs(json=_schema_text(value, param))
        if kind == "json_object":
            return StructuredOutputs(json_object=True)
        if kind == "regex":
            return StructuredOutputs(regex=value)
        if kind == "choice":
            return StructuredOutputs(choice=tuple(value))
        return StructuredOutputs(grammar=lark_from_user_grammar(value))
    except (SamplingParamsError, GrammarError) as error:
        raise APIError(400, f"Invalid '{param}': {error}", param=param) from None


def _schema_text(schema: Any, param: str) -> str:
    """A schema given as an object or as JSON text, serialized (key order kept: it orders the output)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise APIError(
                400, f"Invalid '{param}': the JSON schema is not valid JSON ({error}).", param=param
            ) from None
    if not isinstance(schema, dict | bool):
        raise APIError(400, f"Invalid '{param}': a JSON schema must be an object.", param=param)
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def _from_response_format(response_format: dict[str, Any]) -> StructuredOutputs | None:
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        choices = ", ".join(f"'{t}'" for t in RESPONSE_FORMAT_TYPES)
        raise APIError(
            400,
            f"Invalid 'response_format.type' {kind!r}: expected one of {choices}.",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    json_schema = response_format.get("json_schema")
    if not isinstance(json_schema, dict):
        raise APIError(
            400,
            "'response_format' of type 'json_schema' needs a 'json_schema' object.",
            param="response_format",
        )
    schema = json_schema.get("schema")
    if schema is None:
        return StructuredOutputs(json_object=True)  # OpenAI allows a schema-less json_schema format
    return StructuredOutputs(json=_schema_text(schema, "response_format"))
