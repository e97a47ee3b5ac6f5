"""The phase-free token-budget scheduler: decodes, prefill chunks, prefix sharing and preemption."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from functools import partial

from batchlm.core.admission import AdmissionTickets
from batchlm.core.facts import EngineStats
from batchlm.core.kv_cache_manager import KVCacheManager
from batchlm.core.prompt_logprob_cache import PromptLogprobCache, gathers_prompt_logprobs
from batchlm.core.request_state import RequestState, RequestStatus
from batchlm.core.scheduler_config import SchedulerConfig
from batchlm.core.speculation import Speculator
from batchlm.core.speculative_step import SpeculativeSteps
from batchlm.core.step_builder import InflightSteps, StepBuilder, sampled_by_request
from batchlm.core.step_io import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from batchlm.core.stop_checker import check_stop
from batchlm.core.token_output import ended_output, note_first_token, token_output
from batchlm.outputs import CoreOutputs, EngineCoreOutput, FinishReason, TokenLogprobs
from batchlm.request import EngineCoreRequest


class Scheduler:
    """Decides each step which tokens of which requests to compute, and folds the sampled tokens
    back in. Call schedule() then update_from_output() with its result, once per step.

    Async scheduling: schedule() may be called again before the previous step's update (one step in
    flight). Tokens scheduled but not yet folded in count as in flight: the next step continues after
    them, and a token still being sampled is sent as PLACEHOLDER_TOKEN_ID (the runner fills it in on
    the device). A request found finished when its result arrives may already be in the next step;
    that step's token for it is discarded.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, config.prefix_cache_salt
        )
        self.prompt_logprobs = PromptLogprobCache(config.block_size)
        self._requests: dict[str, RequestState] = {}
        self._tickets = AdmissionTickets()
        self._waiting: deque[RequestState] = deque()
        # Waiting requests not to be admitted yet (their grammar is being compiled): the others
        # are admitted past them.
        self._held: set[str] = set()
        # Sequences recomputed for the long rotation (LongRoPE's switch): they gave up no turn, so they
        # are admitted before the others.
        self._switching: set[str] = set()
        # In admission order: the last one is the first to be preempted.
        self._running: list[RequestState] = []
        # Requests the runner must forget at the next step (finished, aborted or preempted).
        self._dropped_ids: set[str] = set()
        self._inflight = InflightSteps()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._num_preemptions = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._speculative: SpeculativeSteps | None = None
        if config.speculation.enabled:
            speculator = Speculator(config.speculation)
            self._speculative = SpeculativeSteps(speculator, self.kv, config.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (free list plus evictable cached blocks)."""
        return self.kv.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv.num_total_blocks

    def add_request(self, request: EngineCoreRequest, held: bool = False) -> None:
        """Queue a validated request (ValueError for an id already in use); a `held` one is not
        admitted until `release`d."""
        state = RequestState(request, max_model_len=self.config.max_model_len)
        self._validate(state)
        self._requests[request.request_id] = state
        self._tickets.add(request)
        self._waiting.append(state)
        if held:
            self._held.add(request.request_id)

    def release(self, request_ids: Iterable[str]) -> None:
        """Let held requests be admitted (in their turn, as if never held)."""
        self._held.difference_update(request_ids)

    def end_with_errors(self, errors: Mapping[str, str]) -> list[EngineCoreOutput]:
        """End these requests now (with FinishReason.ERROR and each one's error); unknown or finished
        ids are ignored."""
        return self._end_now(errors, FinishReason.ERROR)

    def _validate(self, state: RequestState) -> None:
        """Requests arrive validated (engine/input_processor.py); these only catch a caller that skipped it."""
        config = self.config
        if state.request_id in self._requests:
            raise ValueError(f"request id {state.request_id!r} is already in use")
        assert 0 < state.num_prompt_tokens < config.max_model_len, "the prompt leaves no room in the context"
        # The last generated token is never fed back, so it needs no KV slot.
        assert self.kv.blocks_for_tokens(state.token_limit - 1) <= config.num_blocks, (
            "the request outgrows the KV cache"
        )

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """End requests now and free their blocks; unknown or finished ids are ignored."""
        return self._end_now({request_id: None for request_id in request_ids}, FinishReason.ABORT)

    def _end_now(self, errors: Mapping[str, str | None], reason: FinishReason) -> list[EngineCoreOutput]:
        """abort_requests with `reason` (and each one's error text)."""
        outputs = []
        for request_id, error in errors.items():
            state = self._requests.get(request_id)
            if state is None:
                continue
            if state.status is RequestStatus.RUNNING:
                self._running.remove(state)
            else:
                self._waiting.remove(state)
            self._finish(state, reason)
            outputs.append(ended_output(state, reason, error))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def has_requests_to_schedule(self) -> bool:
        """Unfinished requests besides the held ones."""
        return bool(self._running) or len(self._waiting) > len(self._held)

    def has_requests_to_drop(self) -> bool:
        """Requests that ended (finished, aborted or preempted) which the runner still holds (sampling
        state, grammar matcher, block-table row) until a step names them in finished_request_ids."""
        return bool(self._dropped_ids)

    def stats(self) -> EngineStats:
        speculator = self._speculative.speculator if self._speculative is not None else None
        return EngineStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            num_preemptions=self._num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            spec_proposed_tokens_total=speculator.num_proposed_total if speculator else 0,
            spec_accepted_tokens_total=speculator.num_accepted_total if speculator else 0,
            spec_drafts_total=speculator.num_verify_steps_total if speculator else 0,
        )

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: running requests first (in admission order), then admit waiting
        ones first-come-first-served (fairly across n > 1 siblings: AdmissionTickets.next_in_line)
        while the token budget, max_num_seqs and blocks allow."""
        step = StepBuilder(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:
            # No admissions in a step that had to preempt: the freed blocks go to the survivors.
            self._admit_waiting(step)
        dropped, self._dropped_ids = frozenset(self._dropped_ids), set()
        scheduled, record = step.build(dropped)
        if not scheduled.is_empty:
            self._inflight.append(record)
        return scheduled

    def forget_inflight_steps(self) -> None:
        """Steps whose results will never come (a step cut short by an error or Ctrl-C) are forgotten,
        once every request they carried has ended: the next step is then the oldest in flight."""
        if self.has_unfinished_requests():
            raise RuntimeError("steps in flight can only be forgotten once every request has ended")
        self._inflight.clear()

    @property
    def num_inflight_steps(self) -> int:
        """Steps scheduled whose results have not been folded in yet."""
        return len(self._inflight)

    def _schedule_running(self, step: StepBuilder) -> None:
        """Runs once per running request per step: kept to plain attribute arithmetic."""
        block_size, running, index = self.config.block_size, self._running, 0
        long_rope_after = self.config.long_rope_after
        speculative = self._speculative
        if speculative is not None and not speculative.active(len(running)):
            speculative = None
        draft_reach = self.config.speculation.num_tokens
        while index < len(running) and step.budget > 0:
            state = running[index]
            num_expected = len(state.all_token_ids) + state.num_inflight_samples
            if state.num_inflight_samples and num_expected >= state.token_limit:
                index += 1  # its last token is being sampled: it finishes when that result arrives
                continue
            scheduled_end = state.num_computed_tokens + state.num_inflight_tokens
            drafts = speculative
            if long_rope_after is not None and not state.long_rope:
                if scheduled_end >= long_rope_after:
                    # Its next token makes it longer than the short rotation's reach: all of its KV is
                    # recomputed with the long one, once that token is known (nothing in flight).
                    if state.num_inflight_tokens:
                        index += 1
                    else:
                        running.pop(index)
                        self._preempt(state, counted=False)
                        self._switching.add(state.request_id)
                        step.preempted = True  # the runner drops it this step; it returns next step
                    continue
                if drafts is not None and scheduled_end + draft_reach >= long_rope_after:
                    drafts = None  # draft tokens must not pass the switch before it happens
            if drafts is not None and drafts.schedule(step, state, len(running)):
                index += 1
                continue
            num_new = min(num_expected - scheduled_end, step.budget)
            # The table sent last step still has room for most decodes: no block to allocate.
            needs_blocks = scheduled_end + num_new > state.num_blocks_sent * block_size
            if needs_blocks:
                # Blocks for the tokens in flight too: grow() counts from the computed ones.
                while not self.kv.grow(state, state.num_inflight_tokens + num_new):
                    victim = running.pop()
                    self._preempt(victim)
                    step.preempted = True
                    if victim is state:
                        return
            step.add_tokens(state, num_new, self.kv.unsent_block_ids(state) if needs_blocks else ())
            index += 1

    def needs_step_in_flight(self) -> bool:
        """Async scheduling: whether the next step should wait for the one in flight (speculation)."""
        return self._speculative is not None and self._speculative.needs_step_in_flight(self._running)

    def _admit_waiting(self, step: StepBuilder) -> None:
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            state = self._tickets.next_in_line(self._waiting, self._held, self._switching)
            if state is None:
                return  # every waiting request is held
            long_rope_after = self.config.long_rope_after
            if long_rope_after is not None and not state.long_rope and state.num_tokens > long_rope_after:
                state.switch_to_long_rope()
            cached_blocks = self.kv.find_cached_prefix(state)
            if gathers_prompt_logprobs(state):
                # Hits stand in for rows whose logprobs it reports: only as far as those are kept.
                cached_blocks = cached_blocks[: self.prompt_logprobs.take(state, len(cached_blocks))]
            if self.kv.waits_on_pending_block(state, len(cached_blocks)):
                return  # nobody overtakes a request waiting for its prefix to be computed
            num_cached_tokens = len(cached_blocks) * self.config.block_size
            num_new = min(state.num_tokens - num_cached_tokens, step.budget)
            if not self.kv.admit(state, cached_blocks, num_new):
                return
            if state is self._waiting[0]:
                self._waiting.popleft()
            else:
                self._waiting.remove(state)
            self._tickets.admitted(state.request)
            self._switching.discard(state.request_id)
            self._running.append(state)
            state.status = RequestStatus.RUNNING
            state.num_computed_tokens = num_cached_tokens
            self._prefix_queries += state.num_tokens
            self._prefix_hits += num_cached_tokens
            if state.num_cached_tokens is None:  # its first admission (not a recomputation)
                state.num_cached_tokens = num_cached_tokens
                self._prompt_tokens_total += state.num_prompt_tokens
            step.add_tokens(state, num_new, self.kv.unsent_block_ids(state))

    def _preempt(self, state: RequestState, counted: bool = True) -> None:
        """Free the request's blocks and queue it first for recomputation (its tokens are kept);
        `counted`: a preemption for want of blocks (not a switch to the long rotation)."""
        self.kv.free(state)
        if state.known_to_runner:
            self._dropped_ids.add(state.request_id)
        if self._speculative is not None:
            self._speculative.forget(state.request_id)
        state.reset_for_recompute()
        self._waiting.appendleft(state)
        if counted:
            self._num_preemptions += 1

    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> CoreOutputs:
        """Advance the scheduled requests, append sampled tokens, and finish those that must stop.
        Returns one output per request that got a token or finished. Steps are updated in the order
        they were scheduled."""
        outputs = CoreOutputs()
        if scheduled.is_empty:
            return outputs
        if result.grammar_failures:
            # Before the step's tokens: a failed grammar's last token is only the EOS its mask forced.
            for output in self._end_now(result.grammar_failures, FinishReason.ERROR):
                outputs.append(output)
        sampled = sampled_by_request(scheduled, result)
        record = self._inflight.pop_oldest(scheduled)
        finished_any = False
        commit = self.kv.commit_computed if self.config.enable_prefix_caching else None
        for chunk, state, preemptions in zip(
            scheduled.chunks, record.states, record.preemption_counts, strict=True
        ):
            if state.status is RequestStatus.FINISHED or state.num_preemptions != preemptions:
                # Finished, aborted or preempted while the step was in flight: its work is dropped.
                continue
            if chunk.num_draft_tokens:
                self._fold_verified(chunk, state, result, sampled, outputs)
                finished_any = finished_any or state.is_finished
                continue
            num_tokens = len(chunk.token_ids)
            state.num_inflight_tokens -= num_tokens
            state.num_computed_tokens += num_tokens
            if commit is not None:
                commit(state)
            if not chunk.sample:
                continue
            state.num_inflight_samples -= 1
            token_id, logprobs = sampled[chunk.request_id]
            prompt_logprobs = self._reported_prompt_logprobs(state, result)
            self._append_token(outputs, state, token_id, logprobs, prompt_logprobs)
            finished_any = finished_any or state.is_finished
        if finished_any:
            self._running = [state for state in self._running if not state.is_finished]
        return outputs

    def _fold_verified(
        self,
        chunk: ScheduledChunk,
        state: RequestState,
        result: ModelRunnerOutput,
        sampled: dict[str, tuple[int, TokenLogprobs | None]],
        outputs: CoreOutputs,
    ) -> None:
        assert self._speculative is not None, "a verify chunk without speculation"
        accepted = result.accepted_drafts.get(chunk.request_id)
        if accepted is None:
            raise RuntimeError(f"the model runner returned no verification for request {chunk.request_id!r}")
        self._speculative.fold(
            state,
            chunk,
            accepted,
            sampled[chunk.request_id],
            partial(self._append_token, outputs),
            self._reported_prompt_logprobs(state, result),
        )
        if self.config.enable_prefix_caching and not state.is_finished:
            self.kv.commit_computed(state)

    def _reported_prompt_logprobs(
        self, state: RequestState, result: ModelRunnerOutput
    ) -> tuple[TokenLogprobs, ...]:
        """The prompt's logprobs the runner reports with the request's first sampled token, behind the
        entries its prefix-cache hits stand in for; empty when the runner reports none for it."""
        computed = result.prompt_logprobs.get(state.request_id)
        if computed is None:
            return ()
        if self.config.enable_prefix_caching:
            return self.prompt_logprobs.complete(state, computed)
        return computed

    def _append_token(
        self,
        outputs: CoreOutputs,
        state: RequestState,
        token_id: int,
        logprobs: TokenLogprobs | None,
        prompt_logprobs: tuple[TokenLogprobs, ...] = (),
    ) -> None:
        """Append the token to its request, and its output to `outputs` (none while a
        final_output_only request holds its tokens back)."""
        all_token_ids = state.all_token_ids
        all_token_ids.append(token_id)
        self._generation_tokens_total += 1
        if len(all_token_ids) < state.token_limit and token_id not in state.stop_token_set:
            # The common case, decided without check_stop: no limit reached, not a stop token.
            if state.final_output_only:
                note_first_token(state)
                return
            if logprobs is None and not state.first_output_pending:
                outputs.add_token(state.request_id, token_id)
                return
            decision = None
        else:
            decision = check_stop(state)
            if decision is None and state.final_output_only:
                note_first_token(state)
                return
        if decision is not None:
            self._finish(state, decision.reason)
        outputs.append(token_output(state, token_id, logprobs, prompt_logprobs, decision))

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        """Mark finished and free its blocks; the caller removes it from the running/waiting queue."""
        self.kv.free(state)
        state.status = RequestStatus.FINISHED
        state.finish_reason = reason
        del self._requests[state.request_id]
        self._held.discard(state.request_id)
        self._switching.discard(state.request_id)
        self._tickets.finished(state.request)
        if self._speculative is not None:
            self._speculative.forget(state.request_id)
            self._speculative.speculator.retire(state)
        if state.known_to_runner:
            self._dropped_ids.add(state.request_id)
