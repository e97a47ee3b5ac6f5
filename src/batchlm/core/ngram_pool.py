"""Proposals from other requests: the n-grams of recently finished requests (prompt + output), so that a
request whose own tokens have no match can still copy what an earlier one went on to say (the same
question asked again, the same boilerplate in every answer)."""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence

from batchlm.core.ngram_proposer import TOKEN_BYTES, TOKEN_CODE, latest_match_ends

# Shorter n-grams recur by chance across unrelated requests: only matches this long are used.
POOL_MIN_NGRAM = 3
# Packed after each sequence: no token has this id, so no match spans two sequences.
SEPARATOR_ID = -1
_SEPARATOR = array(TOKEN_CODE, [SEPARATOR_ID]).tobytes()


class NgramPool:
    """Finished requests' token sequences, at most `capacity_tokens` tokens in all (the oldest go
    first), packed one after another as in NgramIndex; a proposal searches them from the newest end.
    Adding or evicting a sequence copies its bytes and nothing more (a dictionary of every n-gram, the
    earlier form, cost the engine thread milliseconds per thousand tokens at each finish)."""

    def __init__(self, max_n: int, capacity_tokens: int) -> None:
        if capacity_tokens < 1:
            raise ValueError(f"the n-gram pool needs a positive capacity, got {capacity_tokens}")
        self.min_n = POOL_MIN_NGRAM
        self.max_n = max(max_n, POOL_MIN_NGRAM)
        self.capacity_tokens = capacity_tokens
        self._packed = bytearray()  # each sequence, then _SEPARATOR; oldest first
        self._lengths: deque[int] = deque()  # tokens of each sequence, oldest first
        self.num_tokens = 0

    def add(self, tokens: Sequence[int]) -> None:
        """Remember a finished request's tokens (a sequence longer than the capacity keeps its end)."""
        kept = tokens[-self.capacity_tokens :]
        if len(kept) <= self.min_n:
            return
        self._packed += array(TOKEN_CODE, kept).tobytes()
        self._packed += _SEPARATOR
        self._lengths.append(len(kept))
        self.num_tokens += len(kept)
        while self.num_tokens > self.capacity_tokens:
            length = self._lengths.popleft()
            del self._packed[: (length + 1) * TOKEN_BYTES]
            self.num_tokens -= length

    def propose(self, tokens: Sequence[int], max_tokens: int) -> tuple[int, ...]:
        """Up to max_tokens tokens that followed the longest n-gram ending `tokens` in a remembered
        sequence (its latest occurrence; a shorter n-gram's when nothing follows that one); empty when
        none matches. At most one search scans the whole pool (latest_match_ends)."""
        if max_tokens < 1 or not self._packed:
            return ()
        sizes = range(self.min_n, min(self.max_n, len(tokens)) + 1)
        if not sizes:
            return ()
        tail = array(TOKEN_CODE, tokens[len(tokens) - sizes[-1] :]).tobytes()
        ends = latest_match_ends(self._packed, tail, sizes, len(self._packed))
        for start in reversed(ends):
            following = array(TOKEN_CODE, self._packed[start : start + max_tokens * TOKEN_BYTES])
            if SEPARATOR_ID in following:
                del following[following.index(SEPARATOR_ID) :]
            if following:
                return tuple(following)
        return ()

    def __len__(self) -> int:
        return len(self._lengths)
