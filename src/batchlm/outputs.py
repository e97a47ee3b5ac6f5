"""Outputs that cross stage boundaries: engine core -> front end, and front end -> user."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Why a sequence ended; values are the OpenAI finish_reason strings."""

    STOP = "stop"  # EOS, a stop token id, or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # aborted by the client or the server
    ERROR = "error"  # the engine failed while the request was running

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities for one generated token, from the model's raw distribution."""

    # Log-probability of the sampled token.
    logprob: float
    # 1-based rank of the sampled token in the distribution.
    rank: int
    # The top-k (token id, logprob) pairs, most likely first (k = SamplingParams.logprobs).
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineCoreOutput:
    """What one engine step produced for one sequence. Treated as immutable, but not frozen: one is
    made per running sequence per step, and a frozen dataclass's __init__ costs several times as much."""

    request_id: str
    # Tokens appended this step (usually one; empty when only finishing, e.g. on abort).
    new_token_ids: tuple[int, ...]
    # One entry per new token when logprobs were asked for, else empty.
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    # Set when the sequence ended this step.
    finish_reason: FinishReason | None = None
    # The stop token id that ended it, if any.
    stop_token_id: int | None = None
    # Prompt tokens served from the prefix cache (reported once the prompt has been computed).
    num_cached_tokens: int = 0
    # Error text when finish_reason is ERROR.
    error: str | None = None
    # time.time() when the request was first scheduled (set on its first output only; queue-time metric).
    scheduled_time: float | None = None
    # time.time() when its first token was sampled, on an output that reports it later
    # (EngineCoreRequest.final_output_only); None: the output's arrival is the time.
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One completion of a request (vLLM's shape). In streaming (delta) mode the text, token ids and
    logprobs hold only what is new since the previous output."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    # None while running; an enum up to the HTTP response builders, which send its value.
    finish_reason: FinishReason | None = None
    # The stop string or stop token id that ended it, if any.
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.time()) of a request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A request's progress or result as the user sees it (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Prompt tokens served from the prefix cache.
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    # Set when the engine failed this request.
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
