"""Tests for the token-level stop conditions and their order."""

from __future__ import annotations

from batchlm.core.request_state import RequestState
from batchlm.core.stop_checker import StopDecision, check_stop
from batchlm.outputs import FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

EOS = 2
STOP_TOKEN = 7


def state_with(outputs: list[int], max_model_len: int = 100, **params: object) -> tuple[RequestState, int]:
    sampling = SamplingParams(stop_token_ids=[STOP_TOKEN], **params)  # type: ignore[arg-type]
    state = RequestState(EngineCoreRequest("r", (10, 11, 12), sampling, (EOS,), 0.0))
    for token in outputs:
        state.append_token(token)
    return state, max_model_len


def decide(outputs: list[int], max_model_len: int = 100, **params: object) -> StopDecision | None:
    state, limit = state_with(outputs, max_model_len, **params)
    return check_stop(state, limit)


def test_ordinary_token_continues() -> None:
    assert decide([5]) is None


def test_eos_stops_without_a_stop_token_id() -> None:
    assert decide([5, EOS]) == StopDecision(FinishReason.STOP, stop_token_id=None)


def test_stop_token_id_is_reported() -> None:
    assert decide([STOP_TOKEN]) == StopDecision(FinishReason.STOP, stop_token_id=STOP_TOKEN)


def test_ignore_eos_keeps_going_but_stop_tokens_still_stop() -> None:
    assert decide([EOS], ignore_eos=True) is None
    assert decide([STOP_TOKEN], ignore_eos=True) == StopDecision(FinishReason.STOP, STOP_TOKEN)


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    # min_tokens=2: the first two tokens never stop; the third may.
    assert decide([EOS], min_tokens=2) is None
    assert decide([5, STOP_TOKEN], min_tokens=2) is None
    assert decide([5, 6, EOS], min_tokens=2) == StopDecision(FinishReason.STOP)


def test_max_tokens_gives_length() -> None:
    assert decide([5, 6], max_tokens=3) is None
    assert decide([5, 6, 8], max_tokens=3) == StopDecision(FinishReason.LENGTH)


def test_stop_token_wins_over_max_tokens_on_the_same_token() -> None:
    assert decide([5, EOS], max_tokens=2) == StopDecision(FinishReason.STOP)


def test_context_limit_gives_length() -> None:
    # 3 prompt tokens + 2 outputs reach a context of 5.
    assert decide([5], max_model_len=5, max_tokens=None) is None
    assert decide([5, 6], max_model_len=5, max_tokens=None) == StopDecision(FinishReason.LENGTH)


def test_the_schedulers_fast_path_decides_exactly_as_check_stop() -> None:
    # The scheduler skips check_stop for a token that is neither a stop token nor at the token limit;
    # over random parameters and tokens, every decision must match check_stop's.
    import random

    from batchlm.core.scheduler import Scheduler, SchedulerConfig

    rng = random.Random(0)
    for trial in range(300):
        max_model_len = rng.randint(5, 20)
        params = SamplingParams(
            max_tokens=(max_tokens := rng.choice([None, 2, 3, 8])),
            min_tokens=rng.choice([0, 0, 2 if max_tokens is None else min(2, max_tokens)]),
            ignore_eos=rng.random() < 0.3,
            stop_token_ids=rng.choice([[], [STOP_TOKEN], [STOP_TOKEN, 9]]),
        )
        scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=1,
                max_num_batched_tokens=64,
                max_model_len=max_model_len,
                block_size=4,
                num_blocks=16,
            )
        )
        request = EngineCoreRequest(f"r{trial}", (10, 11, 12), params, (EOS,), 0.0)
        scheduler.add_request(request)
        state = scheduler._requests[request.request_id]
        reference = RequestState(request)
        while True:
            token = rng.choice([EOS, STOP_TOKEN, 9, 5, 5, 5])
            reference.append_token(token)
            expected = check_stop(reference, max_model_len)
            output = scheduler._append_token(state, token, None)
            assert output.finish_reason == (expected.reason if expected else None)
            assert output.stop_token_id == (expected.stop_token_id if expected else None)
            if expected is not None:
                break
