"""Proposals from other requests: the n-grams of recently finished requests (prompt + output), so that a
request whose own tokens have no match can still copy what an earlier one went on to say (the same
question asked again, the same boilerplate in every answer)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

# Shorter n-grams recur by chance across unrelated requests: only matches this long are used.
POOL_MIN_NGRAM = 3


class NgramPool:
    """Finished requests' token sequences, at most `capacity_tokens` tokens in all (the oldest go
    first), with every n-gram (POOL_MIN_NGRAM <= n <= max_n) mapped to its latest occurrence."""

    def __init__(self, max_n: int, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"the n-gram pool needs a positive capacity, got {capacity_tokens}")
        self.min_n = POOL_MIN_NGRAM
        self.max_n = max(max_n, POOL_MIN_NGRAM)
        self.capacity_tokens = capacity_tokens
        self._sequences: deque[tuple[int, tuple[int, ...]]] = deque()  # (serial, tokens), oldest first
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (serial, its last position)
        self._live: dict[int, tuple[int, ...]] = {}
        self._next_serial = 0
        self.num_tokens = 0

    def add(self, tokens: Sequence[int]) -> None:
        """Remember a finished request's tokens (a sequence longer than the capacity keeps its end)."""
        kept = tuple(tokens[-self.capacity_tokens :])
        if len(kept) <= self.min_n:
            return
        serial, self._next_serial = self._next_serial, self._next_serial + 1
        self._sequences.append((serial, kept))
        self._live[serial] = kept
        self.num_tokens += len(kept)
        for end, gram in self._grams(kept):
            self._index[gram] = (serial, end)
        while self.num_tokens > self.capacity_tokens:
            self._evict_oldest()

    def propose(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, ...]:
        """Up to max_tokens tokens that followed the longest n-gram ending `tokens` in a remembered
        sequence (its latest occurrence); empty when none matches."""
        if max_tokens < 1:
            return ()
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            hit = self._index.get(tuple(tokens[len(tokens) - n :]))
            if hit is None:
                continue
            serial, end = hit
            following = self._live[serial][end + 1 : end + 1 + max_tokens]
            if following:
                return following
        return ()

    def __len__(self) -> int:
        return len(self._sequences)

    def _grams(self, tokens: tuple[int, ...]) -> list[tuple[int, tuple[int, ...]]]:
        """(position of its last token, n-gram) for every n-gram of the sequence."""
        return [
            (end, tokens[end - n + 1 : end + 1])
            for end in range(len(tokens))
            for n in range(self.min_n, min(self.max_n, end + 1) + 1)
        ]

    def _evict_oldest(self) -> None:
        serial, tokens = self._sequences.popleft()
        del self._live[serial]
        self.num_tokens -= len(tokens)
        for _, gram in self._grams(tokens):
            if self._index.get(gram, (None, 0))[0] == serial:
                del self._index[gram]
