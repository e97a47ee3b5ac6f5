"""The edge's mapping of a request's sampling fields onto SamplingParams (server/request_params.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from batchlm.sampling_defaults import SamplingDefaults
from batchlm.sampling_params import SamplingParams
from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from batchlm.server.request_params import SAME_NAMED_FIELDS, build_sampling_params

NO_DEFAULTS = SamplingDefaults()


def _params(body: SamplingFields, defaults: SamplingDefaults = NO_DEFAULTS) -> SamplingParams:
    params, _ = build_sampling_params(
        body, max_tokens=None, logprobs=None, param_names={}, prompt_field="prompt", defaults=defaults
    )
    return params


def test_same_named_fields_exist_on_both_sides() -> None:
    params_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    for name in SAME_NAMED_FIELDS:
        assert name in SamplingFields.model_fields and name in params_fields, name


def test_an_omitted_field_gives_the_sampling_default() -> None:
    params = _params(CompletionRequest(prompt="hi"))
    default = SamplingParams(max_tokens=None)
    for name in SAME_NAMED_FIELDS:
        assert getattr(params, name) == getattr(default, name), name


def test_an_omitted_field_takes_the_model_s_recommended_value_and_a_given_one_wins() -> None:
    model = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1)
    params = _params(CompletionRequest(prompt="hi"), model)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.6, 0.95, 20, 0.05, 1.1,
    )  # fmt: skip
    params = _params(CompletionRequest(prompt="hi", temperature=0, top_k=-1), model)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 0.95, 0, 0.05)
    # Fields the model recommends nothing for keep SamplingParams' defaults.
    params = _params(CompletionRequest(prompt="hi"), SamplingDefaults(temperature=0.7))
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 1.0, 0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_that_is_not_streamed_is_read_only_when_it_finishes(stream: bool) -> None:
    assert _params(CompletionRequest(prompt="hi", stream=stream)).final_output_only is not stream


def test_a_given_field_is_passed_as_it_is() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.25, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2,
            "presence_penalty": 0.3, "frequency_penalty": -0.3, "seed": 11, "min_tokens": 2,
            "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
            "truncate_prompt_tokens": 5, "stop": "x", "stop_token_ids": [3], "logit_bias": {"4": 1.5},
        }
    )  # fmt: skip
    params = _params(body)
    for name in SAME_NAMED_FIELDS:
        assert getattr(params, name) == getattr(body, name), name
    assert (params.stop, params.stop_token_ids, params.logit_bias) == (["x"], [3], {4: 1.5})


def test_an_invalid_value_is_a_400_naming_the_field_as_the_client_spelled_it() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "top_p": 0})
    with pytest.raises(APIError) as caught:
        _params(body)
    assert caught.value.status == 400 and caught.value.param == "top_p"
    names = {"logprobs": "top_logprobs"}
    with pytest.raises(APIError) as caught:
        build_sampling_params(body.model_copy(update={"top_p": None}), max_tokens=None, logprobs=99,
                              param_names=names, prompt_field="messages", defaults=NO_DEFAULTS)  # fmt: skip
    assert caught.value.status == 400 and caught.value.param == "top_logprobs"


PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _schema_of(response_format: dict[str, object]) -> object:
    body = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], response_format=response_format
    )
    constraint = _params(body).structured_outputs
    assert constraint is not None and constraint.json is not None
    return json.loads(constraint.json)


def test_a_schema_beside_json_object_is_honoured() -> None:
    """llama.cpp's, Fireworks' and Together's form (instructor sends it): the schema is not dropped."""
    assert _schema_of({"type": "json_object", "schema": PERSON}) == PERSON


def test_a_strict_json_schema_closes_its_objects_and_a_loose_one_does_not() -> None:
    nested = {"type": "object", "properties": {"who": PERSON}, "required": ["who"]}
    strict = _schema_of(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": nested, "strict": True}}
    )
    assert strict["additionalProperties"] is False
    assert strict["properties"]["who"]["additionalProperties"] is False
    for loose in ({"strict": False}, {}):
        json_schema = {"name": "p", "schema": nested, **loose}
        assert _schema_of({"type": "json_schema", "json_schema": json_schema}) == nested
