"""Output-token accounting: how many tokens a request produced, and how many each chunk carried."""

from __future__ import annotations

from dataclasses import dataclass

from batchlm.bench.records import ChunkCountMethod, RequestResult, TokenSource


@dataclass(frozen=True)
class TokenAccount:
    """A successful request's output tokens and their split over stream chunks."""

    # Output tokens of the request.
    output_tokens: int
    # Where `output_tokens` came from.
    source: TokenSource
    # Tokens carried by each content chunk, aligned with RequestResult.chunk_times;
    # sums to output_tokens. Empty for non-streaming responses.
    chunk_tokens: list[int]
    # How `chunk_tokens` was obtained.
    method: ChunkCountMethod


def spread_evenly(total: int, parts: int) -> list[int]:
    """Splits `total` into `parts` integers that differ by at most one, larger ones last."""
    if parts <= 0:
        return []
    return [(i + 1) * total // parts - i * total // parts for i in range(parts)]


def account_tokens(result: RequestResult) -> TokenAccount:
    """Output tokens from the server's usage when it reported them, else from its /tokenize count of
    the generated text, else one per content chunk (a server sending several tokens a chunk is then
    undercounted)."""
    exact = _exact_chunk_tokens(result) if result.streamed else None
    total, source = result.usage_completion_tokens, TokenSource.USAGE
    if total is None and exact is not None:
        total = sum(exact)
    if total is None and result.counted_completion_tokens is not None:
        total, source = result.counted_completion_tokens, TokenSource.TOKENIZED
    if not result.streamed:
        if total is None:
            return TokenAccount(0, TokenSource.NONE, [], ChunkCountMethod.NOT_STREAMED)
        return TokenAccount(total, source, [], ChunkCountMethod.NOT_STREAMED)
    num_chunks = len(result.chunk_times)
    if total is None:
        return TokenAccount(num_chunks, TokenSource.CHUNKS, [1] * num_chunks, ChunkCountMethod.ONE_PER_CHUNK)
    if exact is not None and sum(exact) == total:
        return TokenAccount(total, source, exact, ChunkCountMethod.EXACT)
    if total == num_chunks:
        return TokenAccount(total, source, [1] * num_chunks, ChunkCountMethod.ONE_PER_CHUNK)
    return TokenAccount(total, source, spread_evenly(total, num_chunks), ChunkCountMethod.SPREAD)


def _exact_chunk_tokens(result: RequestResult) -> list[int] | None:
    """Per-chunk token counts from cumulative usage in every content chunk, else None."""
    cumulative = result.chunk_cumulative_tokens
    if not cumulative or any(value is None for value in cumulative):
        return None
    counts: list[int] = []
    previous = 0
    for value in cumulative:
        assert value is not None
        if value < previous:
            return None  # a server whose counter goes backwards is not trustworthy here
        counts.append(value - previous)
        previous = value
    return counts
