"""The scheduler's speculative path: a decode becomes a verify chunk (the last known token plus draft
tokens, every position sampled), and its result advances the request by the accepted drafts plus one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from batchlm.core.kv_cache_manager import KVCacheManager
from batchlm.core.request_state import RequestState
from batchlm.core.speculation import Speculator
from batchlm.core.step_builder import StepBuilder
from batchlm.core.step_io import AcceptedDrafts, ScheduledChunk
from batchlm.outputs import TokenLogprobs

# (request, token, its logprobs, the prompt's logprobs: given with the first token a request reports)
AppendToken = Callable[[RequestState, int, "TokenLogprobs | None", tuple[TokenLogprobs, ...]], None]


class SpeculativeSteps:
    """Schedules verify chunks and folds their results in. A request with a verify chunk in flight is
    not scheduled again until its result arrives (how many tokens it gains is unknown until then)."""

    def __init__(self, speculator: Speculator, kv: KVCacheManager, block_size: int) -> None:
        self.speculator = speculator
        self.kv = kv
        self.block_size = block_size
        # Requests with a verify chunk in a step not yet folded in.
        self.in_flight: set[str] = set()

    def needs_step_in_flight(self, running: Sequence[RequestState]) -> bool:
        """Async scheduling: whether the next step should wait for the one in flight, because a
        request has a verify chunk in it or would propose drafts once its last token is known."""
        if self.in_flight:
            return True
        if not self.speculator.step_allows(len(running)):
            return False
        return any(self.speculator.likely_to_propose(state) for state in running)

    def active(self, num_running: int) -> bool:
        """Whether a step may take the speculative path (or must: a verify chunk is in flight)."""
        return bool(self.in_flight) or self.speculator.step_allows(num_running)

    def schedule(self, step: StepBuilder, state: RequestState, num_running: int) -> bool:
        """Try to make this step's chunk for a decoding request a verify chunk. True when the request
        is handled for this step: a verify chunk was added, it sits out the step (its verify chunk is
        in flight), or it waits for its in-flight token (async scheduling) because its recent
        proposals matched; False leaves it to the plain decode path."""
        if state.request_id in self.in_flight:
            return True
        if not self.speculator.step_allows(num_running):
            return False
        if not self.speculator.wants(state):
            self.speculator.note_plain_decode(state)
            return False
        if state.num_inflight_tokens:
            if not state.num_inflight_samples:
                return False  # a prefill chunk in flight
            # Its last token is still being sampled: proposals need it. Wait one step when proposals
            # are likely (the last attempt found a match), else keep decoding without speculation.
            return self.speculator.should_wait_for_token(state)
        num_known = len(state.all_token_ids)
        if state.num_computed_tokens + 1 != num_known:
            return False  # prompt (or recompute) still in progress
        # The drafts and the token after them must fit under the limit; the last one needs no KV slot.
        room = min(state.token_limit - num_known - 1, step.budget - 1)
        drafts = self.speculator.propose(state, room)
        if not drafts:
            return False
        num_new = 1 + len(drafts)
        table_changed = state.num_computed_tokens + num_new > state.num_blocks_sent * self.block_size
        if table_changed and not self.kv.grow(state, num_new):
            return False  # drafts never preempt anyone: decode plainly instead
        new_block_ids = self.kv.unsent_block_ids(state) if table_changed else ()
        token_ids = (state.all_token_ids[-1], *drafts)
        chunk = ScheduledChunk(
            state.request_id, token_ids, state.num_computed_tokens, new_block_ids, True, len(drafts)
        )
        state.num_inflight_tokens += num_new
        state.num_inflight_samples += 1
        step.add(chunk, state, num_new)
        self.in_flight.add(state.request_id)
        return True

    def fold(
        self,
        state: RequestState,
        chunk: ScheduledChunk,
        accepted: AcceptedDrafts,
        sampled: tuple[int, TokenLogprobs | None],
        append_token: AppendToken,
        prompt_logprobs: tuple[TokenLogprobs, ...] = (),
    ) -> None:
        """Advance the request past the accepted drafts and the sampled token. Rejected drafts' KV slots
        are simply not counted as computed: the next step overwrites them, in blocks the request keeps.
        append_token makes one output per token (none while final_output_only holds them back), so a
        stop string found after any of them keeps the rest out. A verify chunk that carries the prompt's
        last token samples its first token: `prompt_logprobs` (when asked) go with that one. The caller commits the newly computed blocks to the
        prefix cache if the request is still running."""
        self.in_flight.discard(state.request_id)
        num_accepted = len(accepted.token_ids)
        if (
            num_accepted > chunk.num_draft_tokens
            or accepted.token_ids != chunk.token_ids[1 : 1 + num_accepted]
        ):
            raise RuntimeError(
                f"the model runner accepted drafts that were not proposed for {state.request_id!r}"
            )
        state.num_inflight_tokens -= len(chunk.token_ids)
        state.num_inflight_samples -= 1
        state.num_computed_tokens += 1 + num_accepted
        self.speculator.note_verified(state, chunk.num_draft_tokens, num_accepted)
        for token_id, logprobs in (*zip(accepted.token_ids, accepted.logprobs, strict=True), sampled):
            append_token(state, token_id, logprobs, prompt_logprobs)
            prompt_logprobs = ()
            if state.is_finished:
                break  # a stop token or the limit among the accepted drafts

    def forget(self, request_id: str) -> None:
        """The request finished or was preempted: results in flight for it are dropped."""
        self.in_flight.discard(request_id)
