"""Request validation against the model's limits, and fan-out into engine-core requests."""

from __future__ import annotations

import pytest

from batchlm.engine.client import RequestRejectedError
from batchlm.engine.requests import make_core_requests, validate_request
from batchlm.sampling_params import SamplingParams


def test_max_tokens_defaults_to_the_room_left() -> None:
    params = validate_request([1, 2, 3], SamplingParams(max_tokens=None), max_model_len=10, vocab_size=50)
    assert params.max_tokens == 7


@pytest.mark.parametrize(
    ("prompt", "params", "param", "needle"),
    [
        ([], SamplingParams(), "prompt", "empty"),
        ([1, 99], SamplingParams(), "prompt", "out of range"),
        ([1] * 10, SamplingParams(), "messages", "maximum context length is 10"),
        ([1] * 5, SamplingParams(max_tokens=6), "max_tokens", "you requested 11 tokens"),
        ([1], SamplingParams(stop_token_ids=[50]), "stop_token_ids", "out of range"),
        ([1], SamplingParams(logit_bias={77: 1.0}), "logit_bias", "out of range"),
    ],
)
def test_rejections_name_the_problem(prompt: list[int], params: SamplingParams, param: str, needle: str) -> None:
    with pytest.raises(RequestRejectedError, match=needle) as info:
        validate_request(prompt, params, max_model_len=10, vocab_size=50)
    assert info.value.param == param


def test_fan_out_gives_distinct_reproducible_seeds() -> None:
    requests = make_core_requests("r", [1, 2], SamplingParams(n=3, seed=10), (2,), 0.0)
    assert [r.request_id for r in requests] == ["r:0", "r:1", "r:2"]
    assert [r.seed for r in requests] == [10, 11, 12]
    single = make_core_requests("s", [1], SamplingParams(), (2,), 0.0)
    assert [(r.request_id, r.seed) for r in single] == [("s", None)]
