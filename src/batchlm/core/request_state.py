"""The engine core's mutable per-request state: tokens so far, progress through them, and status."""

from __future__ import annotations

import enum
import sys
from dataclasses import InitVar, dataclass, field

from batchlm.core.block_pool import BlockHash
from batchlm.outputs import FinishReason, TokenLogprobs
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks and is scheduled every step the budget allows
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    """One sequence inside the core. `num_computed_tokens` chases `num_tokens`: the scheduler runs
    the difference through the model, and a token is sampled when the two meet."""

    request: EngineCoreRequest
    # Prompt followed by the generated tokens.
    all_token_ids: list[int] = field(init=False)
    # Tokens whose keys/values are in this request's KV blocks (steps whose results were folded in).
    num_computed_tokens: int = 0
    # Tokens scheduled in steps whose results are not folded in yet (more than zero only between
    # schedule() and update_from_output(), or while async scheduling keeps a step in flight).
    num_inflight_tokens: int = 0
    # How many of those steps sample a token for this request: ids the host does not know yet.
    num_inflight_samples: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # Chained hashes of the full blocks of all_token_ids, extended lazily; each is computed once.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Prompt tokens served from the prefix cache on first admission (None until admitted).
    num_cached_tokens: int | None = None
    # True until the first token has been reported (num_cached_tokens rides on that output).
    first_output_pending: bool = True
    # With SamplingParams.prompt_logprobs, those of the prompt's prefix-cache hits, taken at admission
    # (core/prompt_logprob_cache.py); the runner computes the rest.
    cached_prompt_logprobs: tuple[TokenLogprobs, ...] = ()
    # When its first token was sampled, kept for a request that reports only at the finish.
    first_token_time: float | None = None
    # True when the runner must be sent NewRequestData (first schedule, and again after preemption).
    needs_runner_setup: bool = True
    # True while the runner holds state for this request (sent, and not since dropped).
    known_to_runner: bool = False
    num_preemptions: int = 0
    # Its KV is computed with the model's long rotation (SchedulerConfig.long_rope_after): set at an
    # admission with more tokens than that, kept until it finishes.
    long_rope: bool = False
    # Blocks of its table the runner has been sent (a table only grows while held).
    num_blocks_sent: int = 0
    # The context length (tokens of prompt and output together) of the model; None: no limit here.
    max_model_len: InitVar[int | None] = None
    # Tokens (prompt + output) after which the request must stop: max_tokens or the context limit,
    # whichever comes first. The only place the core computes either.
    token_limit: int = field(init=False)
    # Sampled ids that may end the request (stop_token_ids, and EOS unless ignore_eos): any other
    # token below token_limit needs no stop check.
    stop_token_set: frozenset[int] = field(init=False)

    def __post_init__(self, max_model_len: int | None) -> None:
        self.all_token_ids = list(self.request.prompt_token_ids)
        params = self.request.sampling_params
        limits = [] if max_model_len is None else [max_model_len]
        if params.max_tokens is not None:
            limits.append(len(self.all_token_ids) + params.max_tokens)
        self.token_limit = min(limits, default=sys.maxsize)
        eos = () if params.ignore_eos else self.request.eos_token_ids
        self.stop_token_set = frozenset((*params.stop_token_ids, *eos))
        # Plain attributes, not properties: they are read once or more per request per step.
        self.request_id: str = self.request.request_id
        self.final_output_only: bool = self.request.final_output_only

    @property
    def sampling_params(self) -> SamplingParams:
        return self.request.sampling_params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.request.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_computed_tokens

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens, known or still being sampled, that no step has been given yet."""
        num_expected = len(self.all_token_ids) + self.num_inflight_samples
        return num_expected - self.num_computed_tokens - self.num_inflight_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def switch_to_long_rope(self) -> None:
        """While it holds no blocks: its KV from now on is of the long rotation, so are its block hashes."""
        self.long_rope = True
        self.block_hashes.clear()

    def reset_for_recompute(self) -> None:
        """Preemption: the KV blocks are gone; generated tokens stay and are recomputed as context."""
        self.num_computed_tokens = 0
        # Results of steps still in flight are dropped when they arrive (num_preemptions changed).
        self.num_inflight_tokens = 0
        self.num_inflight_samples = 0
        self.num_blocks_sent = 0
        self.status = RequestStatus.WAITING
        self.needs_runner_setup = True
        self.known_to_runner = False
        self.num_preemptions += 1
