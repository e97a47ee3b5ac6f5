"""The phase-free token-budget scheduler: decodes, prefill chunks, prefix sharing and preemption."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from batchlm.core.kv_cache_manager import KVCacheManager
from batchlm.core.request_state import RequestState, RequestStatus
from batchlm.core.step_io import ModelRunnerOutput, NewRequestData, ScheduledChunk, SchedulerOutput
from batchlm.core.stop_checker import check_stop
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs
from batchlm.request import EngineCoreRequest


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces; resolved once from EngineConfig and the KV-cache size."""

    # Cap on running requests (the --batch-size flag).
    max_num_seqs: int
    # Tokens computed per step, decodes and prefill chunks together.
    max_num_batched_tokens: int
    # Prompt + output tokens allowed per request.
    max_model_len: int
    # Tokens per KV-cache block.
    block_size: int
    # KV-cache blocks available (ids 0 .. num_blocks - 1).
    num_blocks: int
    # Share computed full blocks between requests with the same prefix.
    enable_prefix_caching: bool = True
    # Model/adapter identity, mixed into the first block's hash so different weights never share.
    prefix_cache_salt: str = ""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics and logs."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of KV blocks held by requests, 0..1 (evictable cached blocks count as free).
    kv_cache_usage: float = 0.0
    # Prefix-cache lookups and hits, in tokens, cumulative.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Requests preempted (and later recomputed), cumulative.
    num_preemptions: int = 0


class Scheduler:
    """Decides each step which tokens of which requests to compute, and folds the sampled tokens
    back in. Call schedule() then update_from_output() with its result, once per step."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, config.prefix_cache_salt
        )
        self._requests: dict[str, RequestState] = {}
        self._waiting: deque[RequestState] = deque()
        # In admission order: the last one is the first to be preempted.
        self._running: list[RequestState] = []
        # Requests the runner must forget at the next step (finished, aborted or preempted).
        self._dropped_ids: set[str] = set()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._num_preemptions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (free list plus evictable cached blocks)."""
        return self.kv.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv.num_total_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request. Raises ValueError when it could never run."""
        self._validate(request)
        state = RequestState(request)
        self._requests[request.request_id] = state
        self._waiting.append(state)

    def _validate(self, request: EngineCoreRequest) -> None:
        config, num_prompt = self.config, len(request.prompt_token_ids)
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if num_prompt == 0:
            raise ValueError("the prompt is empty; at least one token is needed")
        if num_prompt >= config.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens; the model's context is {config.max_model_len} tokens, "
                "leaving no room for output"
            )
        max_tokens = request.sampling_params.max_tokens
        longest = config.max_model_len
        if max_tokens is not None:
            longest = min(num_prompt + max_tokens, longest)
        # The last generated token is never fed back, so it needs no KV slot.
        num_blocks = self.kv.blocks_for_tokens(longest - 1)
        if num_blocks > config.num_blocks:
            raise ValueError(
                f"request needs up to {num_blocks} KV-cache blocks ({num_prompt} prompt tokens, up to "
                f"{longest} tokens in all, {config.block_size} per block) but the whole cache has "
                f"{config.num_blocks} blocks; lower max_tokens or enlarge the KV cache"
            )

    def abort_requests(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """End requests now and free their blocks; unknown or finished ids are ignored."""
        outputs = []
        for request_id in request_ids:
            state = self._requests.get(request_id)
            if state is None:
                continue
            if state.status is RequestStatus.RUNNING:
                self._running.remove(state)
            else:
                self._waiting.remove(state)
            self._finish(state, FinishReason.ABORT)
            outputs.append(EngineCoreOutput(request_id, (), finish_reason=FinishReason.ABORT))
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            num_preemptions=self._num_preemptions,
        )

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks: running requests first (in admission order), then admit waiting
        ones first-come-first-served while the token budget, max_num_seqs and blocks allow."""
        step = _StepBuilder(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:
            # No admissions in a step that had to preempt: the freed blocks go to the survivors.
            self._admit_waiting(step)
        dropped, self._dropped_ids = frozenset(self._dropped_ids), set()
        return step.build(dropped)

    def _schedule_running(self, step: _StepBuilder) -> None:
        index = 0
        while index < len(self._running) and step.budget > 0:
            state = self._running[index]
            num_new = min(state.num_uncomputed_tokens, step.budget)
            while not self.kv.grow(state, num_new):
                victim = self._running.pop()
                self._preempt(victim)
                step.preempted = True
                if victim is state:
                    return
            self._add_chunk(step, state, num_new)
            index += 1

    def _admit_waiting(self, step: _StepBuilder) -> None:
        while self._waiting and step.budget > 0 and len(self._running) < self.config.max_num_seqs:
            state = self._waiting[0]
            cached_blocks = self.kv.find_cached_prefix(state)
            if self.kv.waits_on_pending_block(state, len(cached_blocks)):
                return  # FCFS: nobody overtakes a request waiting for its prefix to be computed
            num_cached_tokens = len(cached_blocks) * self.config.block_size
            num_new = min(state.num_tokens - num_cached_tokens, step.budget)
            if not self.kv.admit(state, cached_blocks, num_new):
                return
            self._waiting.popleft()
            self._running.append(state)
            state.status = RequestStatus.RUNNING
            state.num_computed_tokens = num_cached_tokens
            self._prefix_queries += state.num_tokens
            self._prefix_hits += num_cached_tokens
            if state.num_cached_tokens is None:
                state.num_cached_tokens = num_cached_tokens
            self._add_chunk(step, state, num_new)

    def _add_chunk(self, step: _StepBuilder, state: RequestState, num_new: int) -> None:
        start = state.num_computed_tokens
        if state.needs_runner_setup:
            step.new_requests.append(_new_request_data(state))
            state.needs_runner_setup = False
            state.known_to_runner = True
        chunk = ScheduledChunk(
            request_id=state.request_id,
            token_ids=tuple(state.all_token_ids[start : start + num_new]),
            start_position=start,
            block_ids=tuple(self.kv.block_ids(state.request_id)),
            sample=start + num_new == state.num_tokens,
        )
        step.add(chunk)

    def _preempt(self, state: RequestState) -> None:
        """Free the request's blocks and queue it first for recomputation (its tokens are kept)."""
        self.kv.free(state)
        if state.known_to_runner:
            self._dropped_ids.add(state.request_id)
        state.reset_for_recompute()
        self._waiting.appendleft(state)
        self._num_preemptions += 1

    def update_from_output(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Advance the scheduled requests, append sampled tokens, and finish those that must stop.
        Returns one output per request that got a token or finished."""
        sampled = _sampled_by_request(scheduled, result)
        outputs: list[EngineCoreOutput] = []
        finished_any = False
        for chunk in scheduled.chunks:
            state = self._requests.get(chunk.request_id)
            if state is None or state.status is not RequestStatus.RUNNING:
                continue  # aborted while the step was in flight: its token is dropped
            state.num_computed_tokens = chunk.start_position + len(chunk.token_ids)
            self.kv.commit_computed(state)
            if not chunk.sample:
                continue
            if chunk.request_id not in sampled:
                raise RuntimeError(f"the model runner returned no token for request {chunk.request_id!r}")
            token_id, logprobs = sampled[chunk.request_id]
            outputs.append(self._append_token(state, token_id, logprobs))
            finished_any = finished_any or state.is_finished
        if finished_any:
            self._running = [state for state in self._running if not state.is_finished]
        return outputs

    def _append_token(
        self, state: RequestState, token_id: int, logprobs: TokenLogprobs | None
    ) -> EngineCoreOutput:
        state.append_token(token_id)
        decision = check_stop(state, self.config.max_model_len)
        num_cached = 0
        if state.first_output_pending:
            state.first_output_pending = False
            num_cached = state.num_cached_tokens or 0
        if decision is not None:
            self._finish(state, decision.reason)
        return EngineCoreOutput(
            request_id=state.request_id,
            new_token_ids=(token_id,),
            new_logprobs=(logprobs,) if logprobs is not None else (),
            finish_reason=decision.reason if decision else None,
            stop_token_id=decision.stop_token_id if decision else None,
            num_cached_tokens=num_cached,
        )

    def _finish(self, state: RequestState, reason: FinishReason) -> None:
        """Mark finished and free its blocks; the caller removes it from the running/waiting queue."""
        self.kv.free(state)
        state.status = RequestStatus.FINISHED
        state.finish_reason = reason
        del self._requests[state.request_id]
        if state.known_to_runner:
            self._dropped_ids.add(state.request_id)


class _StepBuilder:
    """Collects one step's chunks (decodes ahead of prefill chunks) against the token budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.preempted = False
        self.decodes: list[ScheduledChunk] = []
        self.prefills: list[ScheduledChunk] = []
        self.new_requests: list[NewRequestData] = []

    def add(self, chunk: ScheduledChunk) -> None:
        assert 0 < len(chunk.token_ids) <= self.budget, "chunk outside the token budget"
        self.budget -= len(chunk.token_ids)
        # One-token chunks go first: the attention metadata treats the leading rows as decodes.
        (self.decodes if len(chunk.token_ids) == 1 else self.prefills).append(chunk)

    def build(self, dropped_ids: frozenset[str]) -> SchedulerOutput:
        return SchedulerOutput(
            chunks=(*self.decodes, *self.prefills),
            new_requests=tuple(self.new_requests),
            finished_request_ids=dropped_ids,
        )


def _new_request_data(state: RequestState) -> NewRequestData:
    request = state.request
    return NewRequestData(
        request_id=state.request_id,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=tuple(state.output_token_ids),
        sampling_params=request.sampling_params,
        seed=request.seed,
        eos_token_ids=request.eos_token_ids,
    )


def _sampled_by_request(
    scheduled: SchedulerOutput, result: ModelRunnerOutput
) -> dict[str, tuple[int, TokenLogprobs | None]]:
    """Index the runner's tokens by request, checking there is one per sampling chunk."""
    if not len(result.request_ids) == len(result.sampled_token_ids) == len(result.logprobs):
        raise RuntimeError("ModelRunnerOutput fields have different lengths")
    num_sampling = sum(1 for chunk in scheduled.chunks if chunk.sample)
    if len(result.request_ids) != num_sampling:
        raise RuntimeError(
            f"the model runner returned {len(result.request_ids)} tokens for {num_sampling} sampling chunks"
        )
    return {
        request_id: (token_id, logprobs)
        for request_id, token_id, logprobs in zip(
            result.request_ids, result.sampled_token_ids, result.logprobs, strict=True
        )
    }
