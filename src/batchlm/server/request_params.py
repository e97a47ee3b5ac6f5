"""The HTTP side of the edge: valid Unicode, unsupported OpenAI fields, and the mapping of OpenAI
sampling fields onto batchlm's SamplingParams, the output constraint (`response_format`,
`structured_outputs`, `guided_*`) included; checks against the model are the input processor's."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from pydantic import BaseModel

from batchlm import json_text
from batchlm.engine.input_processor import FieldNames
from batchlm.sampling_defaults import SamplingDefaults
from batchlm.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputs, schema_json
from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from batchlm.structured.backend import GrammarError
from batchlm.structured.spec_grammar import lark_from_user_grammar
from batchlm.tools.closed_schema import closed_objects
from batchlm.unicode_text import encodes

# (field, accepted value test, why it is refused): known OpenAI fields that batchlm does not serve.
UnsupportedRule = tuple[str, Callable[[Any], bool], str]

# OpenAI's deprecated form of tool calling: the same functions are served as `tools`.
_LEGACY_FUNCTIONS = (
    "the deprecated 'functions' and 'function_call' are not served; send each function as a tool "
    "({'type': 'function', 'function': {...}}) in 'tools', and choose with 'tool_choice'"
)

MODERATION = "no moderation model runs here"

CHAT_UNSUPPORTED: tuple[UnsupportedRule, ...] = (
    ("functions", lambda v: not v, _LEGACY_FUNCTIONS),
    ("function_call", lambda v: v in (None, "none"), _LEGACY_FUNCTIONS),
    ("audio", lambda v: v is None, "audio output is not supported"),
    ("modalities", lambda v: v in (None, ["text"]), "only the 'text' modality is supported"),
    ("prediction", lambda v: v is None, "predicted outputs are not supported"),
    ("store", lambda v: v in (None, False), "stored completions are not supported"),
    ("metadata", lambda v: not v, "metadata is only used with stored completions, which are not supported"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "there is one service tier"),
    ("web_search_options", lambda v: v is None, "web search is not supported"),
    ("moderation", lambda v: v is None, MODERATION),
)


def check_unicode(body: BaseModel) -> None:
    """400 naming the first string of `body` (keys included) that is not valid Unicode: a lone UTF-16
    surrogate (e.g. "\\ud800") that JSON escapes allow but no tokenizer or UTF-8 encoder accepts. The
    fast path's JSON parser rejects these already; FastAPI's does not."""
    where = _first_invalid_text(body, "")
    if where is not None:
        raise APIError(
            400,
            f"Invalid value for '{where}': the text contains a lone UTF-16 surrogate (not valid Unicode).",
            param=where,
        )


def _first_invalid_text(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return None if encodes(value) else path
    if isinstance(value, BaseModel):
        # Named as the client spells them: a field's alias ("json", not the attribute json_).
        fields = type(value).model_fields
        value = {
            (fields[name].alias or name) if name in fields else name: item
            for name, item in value.__dict__.items()
        }
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not encodes(key):
                return path or None
            found = _first_invalid_text(item, inner)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_invalid_text(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def refuse_unsupported(body: BaseModel, rules: tuple[UnsupportedRule, ...]) -> None:
    """400 naming the first known field of `body` that holds a value batchlm does not serve."""
    for name, accepted, why in rules:
        if not accepted(getattr(body, name)):
            raise APIError(400, f"'{name}' is not supported by this server: {why}.", param=name)


def check_chat_request(request: ChatCompletionRequest) -> None:
    """Reject chat requests batchlm cannot honour, before any work is done."""
    refuse_unsupported(request, CHAT_UNSUPPORTED)
    _check_stream_options(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


def check_completion_request(request: CompletionRequest) -> None:
    _check_stream_options(request)
    if request.suffix:
        raise APIError(
            400, "'suffix' is not supported by this server (no fill-in-the-middle).", param="suffix"
        )
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(
            400,
            f"'best_of' must equal 'n' ({request.n}): server-side best-of is not supported.",
            param="best_of",
        )


def _check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if request.prompt_logprobs is not None and request.stream:
        # As in vLLM: the chunks have no place for them.
        raise APIError(
            400, "'prompt_logprobs' are not available when 'stream' is true.", param="prompt_logprobs"
        )


# SamplingFields that mean what the SamplingParams field of the same name means (None: its default).
SAME_NAMED_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "min_tokens", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
    "truncate_prompt_tokens", "prompt_logprobs",
)  # fmt: skip


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param_names: dict[str, str],
    prompt_field: str,
    defaults: SamplingDefaults,
) -> tuple[SamplingParams, FieldNames]:
    """Map OpenAI (and extra) sampling fields onto SamplingParams, and say how the request spells the
    fields the input processor may name. Invalid values are a 400 naming the field as the client
    spelled it (`param_names` renames SamplingParams fields, e.g. logprobs). A sampling field the
    request leaves out takes the model's recommended value (`defaults`), if it has one."""
    constraint = structured_outputs_of(request)
    given = defaults.given()
    given.update((name, value) for name in SAME_NAMED_FIELDS if (value := getattr(request, name)) is not None)
    try:
        params = SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
            stop_token_ids=request.stop_token_ids or [],
            logprobs=logprobs,
            # Token ids as JSON object keys carry them (text): SamplingParams reads and checks them.
            logit_bias=cast("dict[int, float]", request.logit_bias or {}),
            structured_outputs=None if constraint is None else constraint[1],
            final_output_only=not request.stream,
            **given,
        )
    except SamplingParamsError as error:
        message = _as_spelled(str(error), param_names)
        raise APIError(400, message, param=param_names.get(error.param, error.param)) from error
    structured_field = constraint[0] if constraint else "structured_outputs"
    return params, FieldNames(prompt_field, prompt_field, prompt_field, structured_field)


def _as_spelled(message: str, param_names: dict[str, str]) -> str:
    """A SamplingParams message with its field names as the request spells them (a client that sent
    top_logprobs is told about top_logprobs, not logprobs)."""
    for ours, theirs in param_names.items():
        message = re.sub(rf"\b{re.escape(ours)}\b", theirs, message)
    return message


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def structured_outputs_of(request: SamplingFields) -> tuple[str, StructuredOutputs] | None:
    """The field the client used and its constraint (None when there is none). 400 for a malformed or
    conflicting one; whether it compiles is the input processor's check."""
    found: list[tuple[str, StructuredOutputs]] = []
    response_format = getattr(request, "response_format", None)
    if response_format is not None and (spec := _from_response_format(response_format)) is not None:
        found.append(("response_format", spec))
    if (fields := request.structured_outputs) is not None:
        kinds = _kinds(fields.json_, fields.json_object, fields.regex, fields.choice, fields.grammar)
        found.append(("structured_outputs", _spec("structured_outputs", kinds)))
    guided = _kinds(
        request.guided_json, None, request.guided_regex, request.guided_choice, request.guided_grammar
    )
    if guided:
        param = f"guided_{next(iter(guided))}"
        found.append((param, _spec(param, guided)))
    if len(found) > 1:
        names = ", ".join(f"'{param}'" for param, _ in found)
        raise APIError(400, f"Only one output constraint may be given; got {names}.", param=found[1][0])
    return found[0] if found else None


def _kinds(json_: Any, json_object: bool | None, regex: Any, choice: Any, grammar: Any) -> dict[str, Any]:
    given = zip(CONSTRAINT_KINDS, (json_, json_object or None, regex, choice, grammar), strict=True)
    return {kind: value for kind, value in given if value is not None}


def _spec(param: str, kinds: dict[str, Any]) -> StructuredOutputs:
    if len(kinds) != 1:
        raise APIError(
            400,
            f"'{param}' must set exactly one of json, json_object, regex, choice or grammar.",
            param=param,
        )
    ((kind, value),) = kinds.items()
    try:
        if kind == "json":
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


def _schema_text(schema: Any, param: str, strict: bool = False) -> str:
    """A schema given as an object or as JSON text, serialized (key order kept: it orders the output).
    strict: its objects that list their properties take no others unless they say so, as in OpenAI's
    strict mode (which requires `additionalProperties: false` on each) and xgrammar's."""
    if isinstance(schema, str):
        try:
            schema = json_text.loads(schema)
        except json_text.NestingTooDeep as error:
            raise APIError(
                400, f"Invalid '{param}': the JSON schema cannot be used: {error}.", param=param
            ) from None
        except ValueError as error:  # a number past Python's digits limit too
            raise APIError(
                400, f"Invalid '{param}': the JSON schema is not valid JSON ({error}).", param=param
            ) from None
    if not isinstance(schema, dict | bool):
        raise APIError(400, f"Invalid '{param}': a JSON schema must be an object.", param=param)
    if strict and isinstance(schema, dict):
        schema = closed_objects(schema)
    try:
        return schema_json(schema)
    except SamplingParamsError as error:  # NaN or Infinity, which Python's JSON reader lets through
        raise APIError(400, f"Invalid '{param}': {error}.", param=param) from None


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
        # llama.cpp, Fireworks and Together take a schema beside json_object (instructor and others
        # send it so): it is honoured rather than dropped for any object.
        if (schema := response_format.get("schema")) is not None:
            return StructuredOutputs(json=_schema_text(schema, "response_format"))
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
    strict = json_schema.get("strict") is True
    return StructuredOutputs(json=_schema_text(schema, "response_format", strict))
