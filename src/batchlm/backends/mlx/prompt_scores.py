"""Prompt logprobs on the MLX loop: scored by a forward of their own (mlx-lm's generator keeps only the
last position's logits), and kept so that a prompt sharing a prefix with one scored before (an eval's
choices after one context) scores only the rest, from the prompt cache's KV of that prefix. The logprob
of token j holds for any prompt whose tokens 0..j are the same, so of a kept prompt sharing s tokens,
the entries of tokens 1..s-1 serve."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import mlx.core as mx

from batchlm.backends.mlx.logprobs import LogprobsQuery, token_logprobs
from batchlm.backends.mlx.prompt_cache import CacheLookup
from batchlm.core.prompt_logprob_cache import PROMPT_LOGPROB_CACHE_BYTES, entry_bytes
from batchlm.core.token_runs import common_prefix_length
from batchlm.outputs import TokenLogprobs
from batchlm.request import EngineCoreRequest

# Scored prompts kept at most (the byte bound usually binds first for long prompts).
MAX_SCORED_PROMPTS = 64


class PromptScores:
    """Not thread-safe: the generation thread owns it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.num_bytes = 0
        # Prompt -> (alternatives listed per entry, the logprobs of its tokens 1..n-1).
        self._kept: OrderedDict[tuple[int, ...], tuple[int, tuple[TokenLogprobs, ...]]] = OrderedDict()

    def covered(self, prompt: Sequence[int], num_top: int) -> tuple[TokenLogprobs, ...]:
        """The kept entries that hold for `prompt` (its tokens 1..m, the longest such run), listing
        num_top alternatives each."""
        if not self.enabled:
            return ()
        best: tuple[TokenLogprobs, ...] = ()
        best_key = None
        for tokens, (kept_top, entries) in self._kept.items():
            usable = min(common_prefix_length(tokens, prompt) - 1, len(entries))
            if kept_top >= num_top and usable > len(best):
                best, best_key = entries[:usable], tokens
        if best_key is None:
            return ()
        self._kept.move_to_end(best_key)
        if self._kept[best_key][0] == num_top:
            return best
        return tuple(replace(entry, top=entry.top[:num_top]) for entry in best)

    def keep(self, prompt: Sequence[int], num_top: int, entries: tuple[TokenLogprobs, ...]) -> None:
        if not self.enabled or not entries:
            return
        key = tuple(prompt)
        old = self._kept.pop(key, None)
        if old is not None:
            self.num_bytes -= len(old[1]) * entry_bytes(old[0])
            if old[0] > num_top:
                num_top, entries = old
        self._kept[key] = (num_top, entries)
        self.num_bytes += len(entries) * entry_bytes(num_top)
        while self._kept and (
            len(self._kept) > MAX_SCORED_PROMPTS or self.num_bytes > PROMPT_LOGPROB_CACHE_BYTES
        ):
            _, (top, dropped) = self._kept.popitem(last=False)
            self.num_bytes -= len(dropped) * entry_bytes(top)


def score_prompt(
    model: Any,
    request: EngineCoreRequest,
    reused: CacheLookup,
    kept: tuple[TokenLogprobs, ...],
    num_rows: int,
) -> tuple[tuple[TokenLogprobs, ...], list[Any]]:
    """The logprobs of each prompt token after the first: `kept` for the tokens 1..k whose KV `reused`
    holds (the tokens 0..k-1), then from a forward of the rest but the last prompt token (the generator
    goes on from there), num_rows positions at a time; and the KV cache that forward filled."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt, num_top = request.prompt_token_ids, request.sampling_params.prompt_logprobs
    assert num_top is not None and len(kept) == reused.num_cached
    cache = reused.cache if reused.cache is not None else make_prompt_cache(model)
    scored = list(kept)
    for start in range(reused.num_cached, len(prompt) - 1, num_rows):
        rows = prompt[start : min(start + num_rows, len(prompt) - 1)]
        logits = model(mx.array([rows]), cache=cache)[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        targets = prompt[start + 1 : start + 1 + len(rows)]
        queries = [LogprobsQuery(logprobs[i], token, num_top) for i, token in enumerate(targets)]
        scored += token_logprobs(queries)
    return tuple(scored), cache
