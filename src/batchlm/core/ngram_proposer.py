"""Prompt-lookup proposals: find the sequence's last few tokens earlier in its own prompt + output and
propose the tokens that followed them there (no draft model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    """For one sequence: every n-gram (min_n <= n <= max_n) that ends before the last token, mapped to
    where its most recent occurrence ends. Extended incrementally as tokens are appended, so a lookup
    costs O(max_n) instead of a scan of the whole sequence."""

    min_n: int
    max_n: int
    # n-gram -> index of its last token, for occurrences ending before `num_indexed`.
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)
    # Positions 0 .. num_indexed - 1 are indexed as n-gram ends.
    num_indexed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.min_n}..{self.max_n}")

    def propose(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, ...]:
        """Up to `max_tokens` tokens predicted to follow `tokens`: the longest n-gram (max_n first)
        that ends the sequence and occurred before is looked up, and what followed its most recent
        occurrence is proposed. Empty when nothing matches or max_tokens < 1."""
        self._extend(tokens)
        if max_tokens < 1:
            return ()
        end = len(tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            match_end = self.last_end.get(tuple(tokens[end - n : end]))
            if match_end is not None:
                return tuple(tokens[match_end + 1 : min(match_end + 1 + max_tokens, end)])
        return ()

    def _extend(self, tokens: Sequence[int]) -> None:
        """Index the n-grams ending at every position but the last (whose n-grams are the query)."""
        last = len(tokens) - 1
        for position in range(self.num_indexed, last):
            for n in range(self.min_n, min(self.max_n, position + 1) + 1):
                self.last_end[tuple(tokens[position - n + 1 : position + 1])] = position
        self.num_indexed = max(self.num_indexed, last)
