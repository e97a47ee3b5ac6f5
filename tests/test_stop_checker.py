"""Tests for the token-level stop conditions and their order."""

from __future__ import annotations

from batchlm.core.request_state import RequestState
from batchlm.core.stop_checker import StopDecision, check_stop
from batchlm.outputs import FinishReason
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams

EOS = 2
STOP_TOKEN = 7


def state_with(outputs: list[int], max_model_len: int = 100, **params: object) -> RequestState:
    sampling = SamplingParams(stop_token_ids=[STOP_TOKEN], **params)  # type: ignore[arg-type]
    request = EngineCoreRequest("r", (10, 11, 12), sampling, (EOS,), 0.0)
    state = RequestState(request, max_model_len=max_model_len)
    for token in outputs:
        state.append_token(token)
    return state


def decide(outputs: list[int], max_model_len: int = 100, **params: object) -> StopDecision | None:
    return check_stop(state_with(outputs, max_model_len, **params))


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
