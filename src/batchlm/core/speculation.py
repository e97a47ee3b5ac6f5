"""When to speculate and what to propose: the scheduler asks once per decode whether a request should
verify draft tokens this step, and reports back how many of them were accepted."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchlm.core.ngram_pool import NgramPool
from batchlm.core.ngram_proposer import NgramIndex
from batchlm.core.request_state import RequestState

SPECULATIVE_MODES = ("auto", "off", "ngram")


@dataclass(frozen=True)
class SpeculationConfig:
    """How the scheduler speculates. "off": never. "ngram": every decode that finds a match proposes.
    "auto": as "ngram", but only while at most `max_batch` requests run (a bigger batch is already
    compute-bound, where verifying rejected tokens costs throughput) and only for requests whose recent
    proposals were mostly accepted."""

    mode: str = "off"
    # Most draft tokens verified per step.
    num_tokens: int = 4
    # n-gram lengths tried, longest first.
    min_ngram: int = 1
    max_ngram: int = 4
    # auto: speculate only while this many requests or fewer are running (0: auto never speculates).
    max_batch: int = 4
    # auto: a request whose acceptance (a moving average over its verify steps) falls below this stops
    # speculating, and probes again after `probe_interval` plain decodes.
    min_acceptance: float = 0.25
    probe_interval: int = 32
    # Tokens of finished requests kept to propose from when a request's own tokens have no match
    # (core/ngram_pool.py); 0: none.
    pool_tokens: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SPECULATIVE_MODES:
            raise ValueError(
                f"speculative mode must be one of {', '.join(SPECULATIVE_MODES)}, got {self.mode!r}"
            )
        if self.num_tokens < 1 or self.max_batch < 0 or self.probe_interval < 1 or self.pool_tokens < 0:
            raise ValueError(
                "num_tokens and probe_interval must be positive, max_batch and pool_tokens not negative"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def most_verify_rows(self, max_num_seqs: int) -> int:
        """Token rows of the largest step of verify chunks the scheduler can send (0 when off): every
        request it lets speculate at once (auto: max_batch of them) with all its drafts."""
        if not self.enabled:
            return 0
        requests = max_num_seqs if self.mode == "ngram" else min(self.max_batch, max_num_seqs)
        return requests * self.most_new_tokens()

    def most_new_tokens(self) -> int:
        """The most tokens of one request a step writes: a verify chunk's, its token and all its drafts
        (1 when off)."""
        return 1 + self.num_tokens if self.enabled else 1


@dataclass
class AcceptanceGate:
    """One request's recent acceptance. Starts open; closes when the moving average falls below the
    threshold, and opens again for one probe after `probe_interval` plain decodes."""

    # Moving average of accepted / proposed per verify step. It starts halfway, so two verify steps that
    # accept nothing close the gate (each one costs a little more than a plain decode).
    rate: float = 0.5
    # Plain decodes left before the next probe while closed.
    cool_down: int = 0

    def is_open(self) -> bool:
        return self.cool_down == 0

    def note_plain_decode(self) -> None:
        if self.cool_down:
            self.cool_down -= 1

    def note_verified(self, num_proposed: int, num_accepted: int, config: SpeculationConfig) -> None:
        self.rate = 0.5 * self.rate + 0.5 * (num_accepted / num_proposed)
        if self.rate < config.min_acceptance:
            self.cool_down = config.probe_interval
            # One good probe reopens the gate: start it from the threshold, not from the low average.
            self.rate = config.min_acceptance


@dataclass
class _Tracked:
    index: NgramIndex
    gate: AcceptanceGate = field(default_factory=AcceptanceGate)
    # Whether the last proposal found a match (a request not tried yet counts as matching, so that it
    # tries at once), and plain decodes since that attempt (async scheduling).
    matched: bool = True
    decodes_since_attempt: int = 0


class Speculator:
    """Proposals and acceptance bookkeeping for the running requests, plus the cumulative counters."""

    def __init__(self, config: SpeculationConfig) -> None:
        self.config = config
        self._tracked: dict[str, _Tracked] = {}
        self.pool = NgramPool(config.max_ngram, config.pool_tokens) if config.pool_tokens else None
        self.num_proposed_total = 0
        self.num_accepted_total = 0
        self.num_verify_steps_total = 0

    def step_allows(self, num_running: int) -> bool:
        """Whether this step speculates at all (auto: only small batches)."""
        if not self.config.enabled:
            return False
        return self.config.mode != "auto" or num_running <= self.config.max_batch

    def wants(self, state: RequestState) -> bool:
        """Whether the request may speculate: sampling it can verify, and (auto) an open gate."""
        if not eligible(state):
            return False
        return self.config.mode != "auto" or self._track(state).gate.is_open()

    def propose(self, state: RequestState, max_tokens: int) -> tuple[int, ...]:
        """Draft tokens to follow the request's tokens (at most max_tokens and config.num_tokens)."""
        tracked = self._track(state)
        length = min(max_tokens, self._draft_length(tracked))
        drafts = tracked.index.propose(state.all_token_ids, length)
        if not drafts and self.pool is not None:
            drafts = self.pool.propose(state.all_token_ids, length)
        tracked.matched, tracked.decodes_since_attempt = bool(drafts), 0
        if not drafts:
            tracked.gate.note_plain_decode()
        return drafts

    def _draft_length(self, tracked: _Tracked) -> int:
        """auto: the full length while at least half the drafts are accepted, else half of it (a probe
        or a request whose acceptance is falling costs less when it is rejected)."""
        full = self.config.num_tokens
        if self.config.mode != "auto" or tracked.gate.rate >= 0.5:
            return full
        return max(1, full // 2)

    def likely_to_propose(self, state: RequestState) -> bool:
        """Whether the request would propose drafts once its last token is known: it may speculate,
        and its last attempt matched (or a probe is due). Changes no bookkeeping."""
        return self.wants(state) and self._attempt_due(self._track(state))

    def should_wait_for_token(self, state: RequestState) -> bool:
        """Async scheduling, the request's last token still in flight: whether to skip it for a step so
        that the next step can propose (when its last attempt matched, or every probe_interval decodes)."""
        tracked = self._track(state)
        tracked.decodes_since_attempt += 1
        return self._attempt_due(tracked)

    def _attempt_due(self, tracked: _Tracked) -> bool:
        """Its last attempt matched, or a probe is due."""
        return tracked.matched or tracked.decodes_since_attempt >= self.config.probe_interval

    def note_plain_decode(self, state: RequestState) -> None:
        tracked = self._tracked.get(state.request_id)
        if tracked is not None:
            tracked.gate.note_plain_decode()

    def note_verified(self, state: RequestState, num_proposed: int, num_accepted: int) -> None:
        self.num_proposed_total += num_proposed
        self.num_accepted_total += num_accepted
        self.num_verify_steps_total += 1
        self._track(state).gate.note_verified(num_proposed, num_accepted, self.config)

    def forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)

    def retire(self, state: RequestState) -> None:
        """A finished request: its tokens join the pool (when there is one), its bookkeeping goes."""
        if self.pool is not None:
            self.pool.add(state.all_token_ids)
        self.forget(state.request_id)

    def _track(self, state: RequestState) -> _Tracked:
        tracked = self._tracked.get(state.request_id)
        if tracked is None:
            index = NgramIndex(self.config.min_ngram, self.config.max_ngram)
            tracked = self._tracked[state.request_id] = _Tracked(index)
        return tracked


def eligible(state: RequestState) -> bool:
    """Requests whose sampling can verify several positions in one step: not under a grammar (its
    matcher would have to follow tokens not yet accepted), without penalties (their token counts would
    have to include them), and past min_tokens (the EOS ban depends on the position)."""
    params = state.sampling_params
    if params.structured_outputs is not None:
        return False
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        return False
    return state.num_output_tokens >= params.min_tokens
