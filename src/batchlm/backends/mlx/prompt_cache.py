"""Prefix reuse for the MLX backend: mlx-lm's LRU prompt cache, with hit accounting and a byte budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

# Finished sequences kept for reuse at most (the byte budget usually binds first).
MAX_CACHED_SEQUENCES = 64


@dataclass(frozen=True)
class CacheLookup:
    """What a new request starts from."""

    # The per-layer KV cache holding the reused prefix (a private copy), or None for a cold start.
    cache: list[Any] | None
    # Prompt tokens already in `cache`; the remaining prompt[num_cached:] must be prefilled.
    num_cached: int


class PromptCache:
    """Keys are token sequences whose KV a finished request left behind; a new prompt starts from the
    longest cached prefix (trimming a longer cached sequence back to the shared part when the cache
    allows it). Not thread-safe: the generation thread owns it."""

    def __init__(self, model_key: Any, max_bytes: int, enabled: bool = True) -> None:
        self.model_key = model_key
        self.max_bytes = max_bytes
        self.enabled = enabled
        self._lru = LRUPromptCache(max_size=MAX_CACHED_SEQUENCES, max_bytes=max_bytes)
        # Prompt tokens looked up and served from the cache, since start.
        self.queries = 0
        self.hits = 0

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def lookup(self, prompt: Sequence[int], max_cached: int | None = None) -> CacheLookup:
        """The longest reusable prefix of `prompt`, always leaving at least one token to compute (the
        last prompt token must run through the model to give the first output's logits), and at most
        max_cached tokens long."""
        self.queries += len(prompt)
        limit = len(prompt) - 1 if max_cached is None else min(max_cached, len(prompt) - 1)
        if not self.enabled or limit <= 0:
            return CacheLookup(None, 0)
        cache, rest = self._lru.fetch_nearest_cache(self.model_key, list(prompt))
        if cache is None:
            return CacheLookup(None, 0)
        excess = len(prompt) - len(rest) - limit
        if excess > 0:
            if not can_trim_prompt_cache(cache):
                return CacheLookup(None, 0)
            trim_prompt_cache(cache, excess)
        num_cached = len(prompt) - len(rest) - max(excess, 0)
        self.hits += num_cached
        return CacheLookup(cache, num_cached)

    def store(self, tokens: Sequence[int], cache: list[Any], active_bytes: int) -> None:
        """Keep a finished sequence's KV (it holds `tokens`), then trim the least recently used entries
        so that the cache and the running batch (`active_bytes`) fit the byte budget together."""
        if not self.enabled or not tokens:
            return
        self._lru.insert_cache(self.model_key, list(tokens), cache)
        self._lru.trim_to(n_bytes=self.max_bytes - active_bytes)
