"""What a request sends back to the front end for a token the scheduler folded in, or when it ends
early: a final_output_only request sends nothing until it finishes, then every token it held back."""

from __future__ import annotations

import time

from batchlm.core.request_state import RequestState
from batchlm.core.stop_checker import StopDecision
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs


def note_first_token(state: RequestState) -> None:
    """A final_output_only request holds its tokens back: the time of its first is kept for the finish."""
    if state.first_token_time is None:
        state.first_token_time = time.time()


def token_output(
    state: RequestState,
    token_id: int,
    logprobs: TokenLogprobs | None,
    prompt_logprobs: tuple[TokenLogprobs, ...],
    decision: StopDecision | None,
) -> EngineCoreOutput:
    """The output for the token just appended; the request's first one carries its cached-token count
    (and the prompt's logprobs, which the caller gives with a first token only)."""
    num_cached = 0
    if state.first_output_pending:
        state.first_output_pending = False
        num_cached = state.num_cached_tokens or 0
    if state.final_output_only:  # finished: every token it held back
        new_token_ids, first_token_time = tuple(state.output_token_ids), state.first_token_time
    else:
        new_token_ids, first_token_time = (token_id,), None
    return EngineCoreOutput(
        request_id=state.request_id,
        new_token_ids=new_token_ids,
        new_logprobs=(logprobs,) if logprobs is not None else (),
        finish_reason=decision.reason if decision else None,
        stop_token_id=decision.stop_token_id if decision else None,
        num_cached_tokens=num_cached,
        first_token_time=first_token_time,
        prompt_logprobs=prompt_logprobs,
    )


def ended_output(state: RequestState, reason: FinishReason, error: str | None) -> EngineCoreOutput:
    """The output of a request ended before its stop (aborted, or failed with `error`)."""
    held_back = tuple(state.output_token_ids) if state.final_output_only else ()
    return EngineCoreOutput(state.request_id, held_back, finish_reason=reason, error=error)
