"""One step under construction (requests' chunks against the token budget) and the record of a step in
flight."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batchlm.core.request_state import RequestState
from batchlm.core.step_io import (
    PLACEHOLDER_TOKEN_ID,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledChunk,
    SchedulerOutput,
)
from batchlm.outputs import TokenLogprobs


@dataclass(frozen=True)
class InflightStep:
    """A scheduled step whose result has not been folded in: the states its chunks belong to, and
    each state's preemption count when it was scheduled (a changed count means the chunk's work was
    thrown away by a preemption, so its result must be ignored)."""

    scheduled: SchedulerOutput
    # Parallel to scheduled.chunks.
    states: tuple[RequestState, ...]
    preemption_counts: tuple[int, ...]


class InflightSteps(deque[InflightStep]):
    """Scheduled steps awaiting update_from_output, oldest first."""

    def pop_oldest(self, scheduled: SchedulerOutput) -> InflightStep:
        if not self or self[0].scheduled is not scheduled:
            raise RuntimeError(
                "update_from_output() got a step that is not the oldest one in flight; "
                "update steps once each, in the order schedule() returned them"
            )
        return self.popleft()


class StepBuilder:
    """Collects one step's chunks (decodes ahead of prefill chunks) against the token budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.preempted = False
        self.decodes: list[ScheduledChunk] = []
        self.prefills: list[ScheduledChunk] = []
        self.decode_states: list[RequestState] = []
        self.prefill_states: list[RequestState] = []
        self.new_requests: list[NewRequestData] = []

    def add(self, chunk: ScheduledChunk, state: RequestState, num_tokens: int) -> None:
        """num_tokens: len(chunk.token_ids), which the caller knows."""
        assert 0 < num_tokens <= self.budget, "chunk outside the token budget"
        self.budget -= num_tokens
        # One-token chunks go first: the attention metadata treats the leading rows as decodes.
        if num_tokens == 1:
            self.decodes.append(chunk)
            self.decode_states.append(state)
        else:
            self.prefills.append(chunk)
            self.prefill_states.append(state)

    def add_tokens(self, state: RequestState, num_new: int, new_block_ids: tuple[int, ...]) -> None:
        """Schedule the request's next num_new tokens (after those in flight) as one chunk, with the
        blocks its table gained; runs once per scheduled request per step."""
        start = state.num_computed_tokens + state.num_inflight_tokens
        end = start + num_new
        if state.needs_runner_setup:
            self.new_requests.append(new_request_data(state))
            state.needs_runner_setup = False
            state.known_to_runner = True
        num_known = len(state.all_token_ids)
        if end <= num_known:
            token_ids = tuple(state.all_token_ids[start:end])
        else:
            # Past the known tokens: the one token the step in flight is sampling for this request.
            assert start == num_known and num_new == 1, "only the token in flight may be unknown"
            token_ids = _PLACEHOLDER_CHUNK
        sample = end == num_known + state.num_inflight_samples
        chunk = ScheduledChunk(state.request_id, token_ids, start, new_block_ids, sample)
        state.num_inflight_tokens += num_new
        if sample:
            state.num_inflight_samples += 1
        self.add(chunk, state, num_new)

    def build(self, dropped_ids: frozenset[str]) -> tuple[SchedulerOutput, InflightStep]:
        scheduled = SchedulerOutput(
            chunks=(*self.decodes, *self.prefills),
            new_requests=tuple(self.new_requests),
            finished_request_ids=dropped_ids,
        )
        states = (*self.decode_states, *self.prefill_states)
        return scheduled, InflightStep(scheduled, states, tuple(s.num_preemptions for s in states))


def new_request_data(state: RequestState) -> NewRequestData:
    request = state.request
    return NewRequestData(
        request_id=state.request_id,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=tuple(state.output_token_ids),
        sampling_params=request.sampling_params,
        seed=request.seed,
        eos_token_ids=request.eos_token_ids,
        long_rope=state.long_rope,
    )


def sampled_by_request(
    scheduled: SchedulerOutput, result: ModelRunnerOutput
) -> dict[str, tuple[int, TokenLogprobs | None]]:
    """Index the runner's tokens by request, checking there is exactly one per sampling chunk."""
    if not len(result.request_ids) == len(result.sampled_token_ids) == len(result.logprobs):
        raise RuntimeError("ModelRunnerOutput fields have different lengths")
    num_sampling = sum(1 for chunk in scheduled.chunks if chunk.sample)
    if len(result.request_ids) != num_sampling:
        raise RuntimeError(
            f"the model runner returned {len(result.request_ids)} tokens for {num_sampling} sampling chunks"
        )
    sampled = {
        request_id: (token_id, logprobs)
        for request_id, token_id, logprobs in zip(
            result.request_ids, result.sampled_token_ids, result.logprobs, strict=True
        )
    }
    for chunk in scheduled.chunks:
        if chunk.sample and chunk.request_id not in sampled:
            raise RuntimeError(f"the model runner returned no token for request {chunk.request_id!r}")
    return sampled


_PLACEHOLDER_CHUNK = (PLACEHOLDER_TOKEN_ID,)
