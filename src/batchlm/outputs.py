"""Outputs that cross stage boundaries: engine core -> front end, and front end -> user."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
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
    # On the first output of a request that asked SamplingParams.prompt_logprobs: one entry per prompt
    # token after the first.
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def carries_more(output: EngineCoreOutput) -> bool:
    """Whether an output is more than its request id and new token ids."""
    return (
        output.finish_reason is not None
        or bool(output.new_logprobs)
        or bool(output.prompt_logprobs)
        or bool(output.num_cached_tokens)
        or output.scheduled_time is not None
        or output.first_token_time is not None
        or output.error is not None
        or output.stop_token_id is not None
    )


@dataclass(slots=True, eq=False)
class CoreOutputs:
    """What engine steps produced, in order, as columns: each output's request id and new token ids.

    Most outputs of a decode step are one new token and nothing else. Those stay two column entries,
    which cost a fraction of an object each to make, route and pickle on the core's step loop. The
    few that carry more (a finish, logprobs, cached tokens, an error, a time, a stop token) are also
    kept whole, by position. Iterating gives every output as an EngineCoreOutput, and two are equal
    (a list of outputs too) when they give the same outputs."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[tuple[int, ...]] = field(default_factory=list)
    # Position -> the output, for those that carry more than their tokens.
    whole: dict[int, EngineCoreOutput] = field(default_factory=dict)

    @classmethod
    def of(cls, outputs: Iterable[EngineCoreOutput]) -> CoreOutputs:
        packed = cls()
        for output in outputs:
            packed.append(output)
        return packed

    def add_token(self, request_id: str, token_id: int) -> None:
        """An output of one new token and nothing else."""
        self.request_ids.append(request_id)
        self.token_ids.append((token_id,))

    def append(self, output: EngineCoreOutput) -> None:
        if carries_more(output):
            self.whole[len(self.request_ids)] = output
        self.request_ids.append(output.request_id)
        self.token_ids.append(output.new_token_ids)

    def extend(self, other: CoreOutputs) -> None:
        offset = len(self.request_ids)
        self.whole.update((offset + index, output) for index, output in other.whole.items())
        self.request_ids.extend(other.request_ids)
        self.token_ids.extend(other.token_ids)

    def set_scheduled_time(self, index: int, scheduled_time: float) -> None:
        """Stamp the output at `index` with its request's first scheduling time."""
        output = self.whole.get(index) or EngineCoreOutput(self.request_ids[index], self.token_ids[index])
        self.whole[index] = replace(output, scheduled_time=scheduled_time)

    def select(self, indices: list[int]) -> CoreOutputs:
        """The outputs at these positions, in that order."""
        whole = self.whole
        return CoreOutputs(
            [self.request_ids[index] for index in indices],
            [self.token_ids[index] for index in indices],
            {position: whole[index] for position, index in enumerate(indices) if index in whole},
        )

    def finished_request_ids(self) -> list[str]:
        return [output.request_id for output in self.whole.values() if output.finish_reason is not None]

    def __len__(self) -> int:
        return len(self.request_ids)

    def num_tokens(self) -> int:
        """New token ids in all the outputs."""
        return sum(map(len, self.token_ids))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CoreOutputs | list):
            return list(self) == list(other)
        return NotImplemented

    def __iter__(self) -> Iterator[EngineCoreOutput]:
        whole = self.whole
        for index, (request_id, token_ids) in enumerate(zip(self.request_ids, self.token_ids, strict=True)):
            output = whole.get(index)
            yield output if output is not None else EngineCoreOutput(request_id, token_ids)


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
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing comes
    # before it); on the first output of a stream, and on every cumulative one.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    extra: dict[str, object] = field(default_factory=dict)
