"""The typed records a benchmark run passes around: what to send, and what happened to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class TokenSource(str, Enum):
    """Where a request's output-token count came from."""

    USAGE = "usage"  # the server's usage.completion_tokens
    # The server's /tokenize count of the generated text (no usage reported).
    TOKENIZED = "tokenized"
    CHUNKS = "chunks"  # one token per content-bearing stream chunk (no usage, no /tokenize)
    NONE = "none"  # non-streaming response without usage: not countable


class ChunkCountMethod(str, Enum):
    """How tokens were assigned to individual stream chunks (for per-token ITL and peak throughput)."""

    EXACT = "exact"  # the server sent cumulative usage in every content chunk
    SPREAD = "spread"  # the output total (usage, or the /tokenize count) spread evenly over the chunks
    # One token per chunk: no output total is known, or it equals the chunk count.
    ONE_PER_CHUNK = "one_per_chunk"
    NOT_STREAMED = "not_streamed"  # non-streaming: all tokens arrive with the response


@dataclass(frozen=True)
class RequestSpec:
    """One request of the workload."""

    # The prompt text (user message for chat, raw prompt for completions).
    prompt: str
    # max_tokens sent to the server.
    max_tokens: int
    # Prompt length in tokens when the dataset knows it (random prompts); None = unknown.
    prompt_len: int | None = None
    # Seconds a closed-loop user "thinks" before sending this request.
    think_time: float = 0.0


@dataclass
class RequestResult:
    """The timeline of one request, all times from time.perf_counter()."""

    # Index of the request in the workload (its position in the sent order).
    index: int
    # The spec this request was built from.
    spec: RequestSpec
    # When the request became due (open loop: its arrival time); equals `start` in closed loop.
    scheduled: float = 0.0
    # Just before the HTTP request was written.
    start: float = 0.0
    # When the response was complete (or the failure was seen).
    end: float = 0.0
    # Arrival time of each content-bearing stream chunk.
    chunk_times: list[float] = field(default_factory=list)
    # Cumulative usage.completion_tokens carried by each content chunk, or None where absent.
    chunk_cumulative_tokens: list[int | None] = field(default_factory=list)
    # Final usage reported by the server.
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    # Characters of generated text (to tell an empty response from a real one).
    generated_chars: int = 0
    # The generated text, kept when the run saves detailed results or the server reported no usage.
    generated_text: str | None = None
    # Without usage: the output tokens the server's /tokenize counts in the generated text.
    counted_completion_tokens: int | None = None
    # Failure reason; None = success.
    error: str | None = None
    # Whether the request was sent with stream=true.
    streamed: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        """End-to-end latency in seconds."""
        return self.end - self.start
