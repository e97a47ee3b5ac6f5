"""The grammar-backend interface: compile a StructuredOutputs spec once, then drive one matcher per
sequence (fill its row of a token bitmask, accept each sampled token)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import numpy as np

from batchlm.sampling_params import StructuredOutputs


class GrammarError(ValueError):
    """A schema, regex or grammar that does not compile; the message names the problem."""


def grammar_failure_error(reason: str) -> str:
    """The error a request ends with when its grammar fails while generating (`reason`: the
    matcher's failure)."""
    return f"the grammar of its structured output failed: {reason}"


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar."""

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` ([words] int32, bit t % 32 of word t // 32)."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance over a sampled token; False if the grammar rejects it (the matcher then allows only EOS)."""
        ...

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and only EOS may follow."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the grammar can follow the sequence no further (it failed, e.g. past a limit of the
        grammar engine, and allows only EOS now); None while it is sound."""
        ...


class MatcherBatch(Protocol):
    """The same matchers, one per row, step after step: a decode batch of constrained sequences, each
    taking one token a step. Prepared once, so that a step costs the backend's calls and a few list
    operations rather than Python per row."""

    def advance_one(self, token_ids: list[int]) -> list[bool]:
        """Advance row i's matcher over token_ids[i]; per row, False if its grammar rejected it."""
        ...

    def fill(self, bitmask: np.ndarray) -> None:
        """Fill bitmask[i] ([rows, words] int32, C-contiguous) for row i's matcher."""
        ...

    def step(self, token_ids: list[int], bitmask: np.ndarray) -> list[bool]:
        """advance_one, then fill: the steady decode step in one call."""
        ...


class GrammarBackend(Protocol):
    """Compiles specs for one tokenizer and makes matchers from them."""

    # Width of one bitmask row in int32 words (covers the model's vocabulary).
    bitmask_words: int
    # The ids a finished grammar allows.
    eos_token_ids: tuple[int, ...]

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar. Raises GrammarError if it does not compile."""
        ...

    def batch(self, matchers: list[GrammarMatcher]) -> MatcherBatch:
        """These matchers as the rows of a batch that advances one token a step."""
        ...

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: np.ndarray) -> None:
        """Fill bitmask[i] for matchers[i], all rows at once (a backend may spread them over threads)."""
        ...

    def advance(self, matchers: list[GrammarMatcher], new_tokens: list[list[int]]) -> list[bool]:
        """Advance matchers[i] over new_tokens[i] (a backend may spread them over threads); per
        matcher, False if its grammar rejected one of them."""
        ...

    def advance_and_fill(
        self, matchers: list[GrammarMatcher], new_tokens: list[list[int]], bitmask: np.ndarray
    ) -> list[bool]:
        """advance, then fill_bitmasks: a step's grammar work in one call."""
        ...


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A small least-recently-used cache (compiled grammars, keyed by StructuredOutputs.key)."""

    def __init__(self, capacity: int, on_evict: Callable[[V], None] | None = None) -> None:
        self.capacity = capacity
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The cached value (a hit, made the most recent), or None (not counted: get_or_make follows)."""
        value = self._items.get(key)
        if value is not None:
            self.hits += 1
            self._items.move_to_end(key)
        return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()  # an exception leaves nothing cached
        self._items[key] = value
        if len(self._items) > self.capacity:
            _, evicted = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(evicted)
        return value

    def discard(self, key: K, value: V) -> None:
        """Drop `key` while it still holds `value` (as an eviction: on_evict runs)."""
        if self._items.get(key) is value:
            del self._items[key]
            if self._on_evict is not None:
                self._on_evict(value)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask row allows ([words] int32 -> sorted ids below vocab_size)."""
    bits = np.unpackbits(np.ascontiguousarray(row).view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


class EndingMatcher:
    """Stands in for a grammar that failed to compile in the engine: the sequence ends at once."""

    def __init__(self, eos_token_ids: tuple[int, ...], reason: str) -> None:
        self._eos_token_ids = eos_token_ids
        self.failure = reason

    def fill_bitmask(self, row: np.ndarray) -> None:
        fill_eos_only(row, self._eos_token_ids)

    def accept(self, token_id: int) -> bool:
        return token_id in self._eos_token_ids

    @property
    def is_terminated(self) -> bool:
        return True


def fill_eos_only(row: np.ndarray, eos_token_ids: tuple[int, ...] | list[int]) -> None:
    """Allow only the EOS ids in a bitmask row: how a sequence whose grammar failed is ended."""
    words = row.view(np.uint32)
    words[:] = 0
    for token_id in eos_token_ids:
        words[token_id // 32] |= np.uint32(1 << (token_id % 32))
