"""Request validation against the model's limits (the input processor), and fan-out into engine-core
requests."""

from __future__ import annotations

import pytest

from batchlm.core.facts import ModelFacts
from batchlm.engine.client import RequestRejectedError
from batchlm.engine.input_processor import InputProcessor
from batchlm.engine.output_processor import make_core_requests
from batchlm.sampling_params import SamplingParams, SamplingParamsError


def validate_request(
    prompt: list[int], params: SamplingParams, max_model_len: int, vocab_size: int
) -> SamplingParams:
    return InputProcessor(ModelFacts(max_model_len, vocab_size)).process(prompt, params).params


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
def test_rejections_name_the_problem(
    prompt: list[int], params: SamplingParams, param: str, needle: str
) -> None:
    with pytest.raises(RequestRejectedError, match=needle) as info:
        validate_request(prompt, params, max_model_len=10, vocab_size=50)
    assert info.value.param == param


def test_fan_out_gives_distinct_reproducible_seeds() -> None:
    requests = make_core_requests("r", [1, 2], SamplingParams(n=3, seed=10), (2,), 0.0)
    assert [r.request_id for r in requests] == ["r:0", "r:1", "r:2"]
    assert [r.seed for r in requests] == [10, 11, 12]
    single = make_core_requests("s", [1], SamplingParams(), (2,), 0.0)
    assert [(r.request_id, r.seed) for r in single] == [("s", None)]


@pytest.mark.parametrize(
    ("prompt_len", "limits", "max_tokens", "message"),
    [
        (10, {"max_model_len": 10}, 4, "maximum context length is 10 tokens.*10 tokens, leaving no room"),
        (8, {"num_blocks": 2}, 2, "needs up to 3 KV-cache blocks .* the whole cache has 2 blocks"),
        (9, {"num_blocks": 2, "max_model_len": 64}, None, "9 tokens of the prompt need 3 KV-cache blocks"),
        (0, {}, 4, "is empty"),
    ],
)
def test_requests_that_can_never_run_are_rejected(
    prompt_len: int, limits: dict[str, int], max_tokens: int | None, message: str
) -> None:
    # These were the scheduler's checks; the scheduler now takes requests as validated.
    model = ModelFacts(**{"max_model_len": 32, "vocab_size": 50, "block_size": 4, **limits})
    with pytest.raises(RequestRejectedError, match=message):
        InputProcessor(model).process([1] * prompt_len, SamplingParams(max_tokens=max_tokens))


def test_an_unset_max_tokens_is_cut_to_the_room_the_kv_cache_leaves() -> None:
    # A cache smaller than the context (--cpu-kv-cache-gib, a GPU's memory): a request that sets no
    # length gets what the cache can hold (its last token takes no slot), not a 400.
    model = ModelFacts(max_model_len=64, vocab_size=50, num_blocks=2, block_size=4)
    params = InputProcessor(model).process([1] * 4, SamplingParams(max_tokens=None, min_tokens=9)).params
    assert (params.max_tokens, params.min_tokens) == (5, 5)
    # An explicit max_tokens beyond the cache is still refused, as before.
    with pytest.raises(RequestRejectedError, match="needs up to 3 KV-cache blocks"):
        InputProcessor(model).process([1] * 4, SamplingParams(max_tokens=6))
    # The model's own default length and the context still cut it where they are shorter.
    roomy = ModelFacts(max_model_len=16, vocab_size=50, num_blocks=100, block_size=4)
    assert InputProcessor(roomy).process([1] * 4, SamplingParams(max_tokens=None)).params.max_tokens == 12
    assert (
        InputProcessor(roomy, default_max_tokens=3)
        .process([1] * 4, SamplingParams(max_tokens=None))
        .params.max_tokens
        == 3
    )


def test_a_text_is_refused_by_its_length_only_where_the_tokenizer_bounds_it() -> None:
    bounded = InputProcessor(ModelFacts(10, 50), max_chars_per_token=3)
    bounded.check_text_length(30, "prompt")
    with pytest.raises(RequestRejectedError, match="31 characters long") as info:
        bounded.check_text_length(31, "prompt")
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    InputProcessor(ModelFacts(10, 50)).check_text_length(10**9, "prompt")


def test_truncation_keeps_the_last_tokens_and_drops_the_text() -> None:
    processor = InputProcessor(ModelFacts(max_model_len=8, vocab_size=50))
    params = SamplingParams(max_tokens=None, truncate_prompt_tokens=5)
    request = processor.process(list(range(20)), params, prompt="long")
    assert request.prompt_token_ids == [15, 16, 17, 18, 19] and request.prompt is None
    assert request.params.max_tokens == 3  # the room the truncated prompt leaves
    short = processor.process([1, 2], SamplingParams(max_tokens=None, truncate_prompt_tokens=5), prompt="hi")
    assert short.prompt_token_ids == [1, 2] and short.prompt == "hi" and short.params.max_tokens == 6


def test_truncation_to_minus_one_keeps_the_context_lengths_last_tokens() -> None:
    # vLLM's -1: the model's context length. A prompt that fits is kept whole; a longer one keeps its
    # last max_model_len tokens, which leave no room for a completion (the 400 vLLM gives too).
    processor = InputProcessor(ModelFacts(max_model_len=8, vocab_size=50))
    params = SamplingParams(max_tokens=2, truncate_prompt_tokens=-1)
    fits = processor.process([1, 2, 3], params, prompt="abc")
    assert fits.prompt_token_ids == [1, 2, 3] and fits.prompt == "abc"
    with pytest.raises(RequestRejectedError, match="8 tokens, leaving no room"):
        processor.process(list(range(20)), params)
    with pytest.raises(SamplingParamsError, match=r"-1 \(the model's context length\) or at least 1"):
        SamplingParams(truncate_prompt_tokens=-2)


def test_offline_prompt_ids_become_plain_ints_whatever_integers_they_were() -> None:
    import numpy as np

    from batchlm.engine.llm import _token_id_list

    converted = _token_id_list(np.array([3, 7, 11], dtype=np.int32))
    assert converted == [3, 7, 11] and all(type(t) is int for t in converted)
    assert _token_id_list((np.int64(5), True, 9)) == [5, 1, 9]
    # What int() accepts is still accepted; the range check then refuses what no vocabulary holds.
    assert _token_id_list([2.0, 4]) == [2, 4]
    assert _token_id_list([2**70]) == [2**70]
    with pytest.raises(RequestRejectedError, match="out of range"):
        InputProcessor(ModelFacts(10, 50)).process(_token_id_list([1, 2**70]), SamplingParams())
