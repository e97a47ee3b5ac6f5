"""Token-level stop conditions, checked after each sampled token (stop strings are the front end's)."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.core.request_state import RequestState
from batchlm.outputs import FinishReason


@dataclass(frozen=True)
class StopDecision:
    """Why a request ends after its latest token."""

    reason: FinishReason
    # The stop_token_ids entry that ended it (None for EOS and length limits).
    stop_token_id: int | None = None


def check_stop(state: RequestState) -> StopDecision | None:
    """Checks, in order: stop token ids and EOS (`stop_token_set`: EOS left out under ignore_eos;
    neither counts until more than min_tokens tokens exist, matching the sampler which masks them
    before that), then the token limit (max_tokens or the context, `token_limit`). Returns None while
    the request should continue: always for a token neither in `stop_token_set` nor at the limit."""
    params = state.sampling_params
    last_token = state.all_token_ids[-1]
    if last_token in state.stop_token_set and state.num_output_tokens > params.min_tokens:
        stop_token_id = last_token if last_token in params.stop_token_ids else None
        return StopDecision(FinishReason.STOP, stop_token_id=stop_token_id)
    if state.num_tokens >= state.token_limit:
        return StopDecision(FinishReason.LENGTH)
    return None
