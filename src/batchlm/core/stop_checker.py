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


def check_stop(state: RequestState, max_model_len: int) -> StopDecision | None:
    """Checks, in order: stop token ids and EOS (EOS skipped under ignore_eos; neither counts until
    more than min_tokens tokens exist, matching the sampler which masks them before that), then
    max_tokens, then the context limit. Returns None while the request should continue."""
    params = state.sampling_params
    num_output = state.num_output_tokens
    last_token = state.all_token_ids[-1]
    if num_output > params.min_tokens:
        if last_token in params.stop_token_ids:
            return StopDecision(FinishReason.STOP, stop_token_id=last_token)
        if not params.ignore_eos and last_token in state.request.eos_token_ids:
            return StopDecision(FinishReason.STOP)
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return StopDecision(FinishReason.LENGTH)
    if state.num_tokens >= max_model_len:
        return StopDecision(FinishReason.LENGTH)
    return None
