"""Prompt-lookup proposals: find the sequence's last few tokens earlier in its own prompt + output and
propose the tokens that followed them there (no draft model)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

# Token ids packed as 32-bit ints: an n-gram is a byte string, found by bytes' own search, in C.
TOKEN_CODE = "i"
TOKEN_BYTES = array(TOKEN_CODE).itemsize


def latest_aligned(packed: bytearray, gram: bytes | bytearray, stop: int) -> int | None:
    """The byte offset of the last occurrence of `gram` that starts on a token and ends by `stop`."""
    while True:
        offset = packed.rfind(gram, 0, stop)
        if offset < 0:
            return None
        if offset % TOKEN_BYTES == 0:
            return offset
        stop = offset + len(gram) - 1  # it straddles two tokens: look further back


def latest_match_ends(packed: bytearray, tail: bytes | bytearray, sizes: range, stop: int) -> list[int]:
    """For n in `sizes` (ascending), while one is found: the byte offset just past the latest
    occurrence, ending by `stop`, of the last n tokens of `tail` (packed tokens, at least
    sizes[-1] of them). Shortest first: the latest occurrence of an (n+1)-gram ends no later than
    the latest of its last n tokens, so each search starts where the last one matched, and at most
    one of them (the first that fails) scans to the start of `packed`."""
    ends: list[int] = []
    for n in sizes:
        gram = tail[len(tail) - n * TOKEN_BYTES :]
        offset = latest_aligned(packed, gram, stop)
        if offset is None:
            break
        stop = offset + len(gram)
        ends.append(stop)
    return ends


@dataclass
class NgramIndex:
    """For one sequence: its tokens packed into bytes, searched from the end for the n-grams
    (min_n <= n <= max_n) that end it. Packing is extended as tokens are appended; nothing is
    indexed per n-gram, so a long prompt costs one conversion instead of a dictionary entry per
    n-gram and position (which stalled the engine thread for milliseconds per thousand tokens)."""

    min_n: int
    max_n: int
    # The sequence's first `num_packed` tokens, TOKEN_BYTES each.
    packed: bytearray = field(default_factory=bytearray)
    num_packed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {self.min_n}..{self.max_n}")

    def propose(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, ...]:
        """Up to `max_tokens` tokens predicted to follow `tokens`: the longest n-gram that ends the
        sequence and occurred before is found, and what followed its most recent occurrence is
        proposed. Empty when nothing matches or max_tokens < 1. `tokens` only grows between calls."""
        self._pack(tokens)
        if max_tokens < 1:
            return ()
        end = len(tokens)
        match_end = self._longest_match_end(end)
        if match_end is None:
            return ()
        return tuple(tokens[match_end + 1 : min(match_end + 1 + max_tokens, end)])

    def _longest_match_end(self, end: int) -> int | None:
        """Where the most recent earlier occurrence of the longest matching n-gram ends."""
        sizes = range(self.min_n, min(self.max_n, end - 1) + 1)
        if not sizes:
            return None
        tail = self.packed[(end - sizes[-1]) * TOKEN_BYTES : end * TOKEN_BYTES]
        # An earlier occurrence ends before the last token.
        ends = latest_match_ends(self.packed, tail, sizes, (end - 1) * TOKEN_BYTES)
        return ends[-1] // TOKEN_BYTES - 1 if ends else None

    def _pack(self, tokens: Sequence[int]) -> None:
        if len(tokens) < self.num_packed:  # not the sequence packed so far: start again
            self.packed, self.num_packed = bytearray(), 0
        if len(tokens) > self.num_packed:
            self.packed += array(TOKEN_CODE, tokens[self.num_packed :]).tobytes()
            self.num_packed = len(tokens)
