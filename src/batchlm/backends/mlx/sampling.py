"""Per-request samplers, logits processors and stop-token automata for mlx-lm's BatchGenerator.

The semantics match batchlm.sampling (the PyTorch engine): logit_bias, then the min_tokens ban, then
the repetition / presence / frequency penalties, then temperature, top-k, top-p and min-p, then a draw.
Requests with the same unseeded knobs share one sampler object, so mlx-lm samples them in one call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from batchlm.sampling_params import SamplingParams

# mlx-lm's callables: a sampler maps logprobs [B, V] to token ids [B]; a processor maps
# (context token ids [T], logits [1, V]) to logits [1, V].
Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
SamplerKey = tuple[float, int, float, float]
# mx.random.key takes an unsigned 64-bit seed.
SEED_MODULUS = 1 << 64
# The least top_p handed to mlx-lm: a normal float32, far below any vocabulary's 1 / size.
SMALLEST_TOP_P = 1e-30


def greedy_sample(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)  # [B]


def _truncate(logprobs: mx.array, key: SamplerKey) -> mx.array:
    """Temperature, then top-k, top-p and min-p on log-probabilities [B, V]."""
    temperature, top_k, top_p, min_p = key
    scaled = logprobs * (1.0 / temperature)  # [B, V]
    if top_k > 0:
        scaled = apply_top_k(scaled, top_k)
    if top_p < 1.0:
        # Renormalise so the cumulative mass is computed on a distribution (scaled is <= 0, no overflow).
        scaled = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
        # A top_p below float32's range is 0 to mlx-lm's top-p, which then drops every token and reads
        # its threshold past the row's end (a draw from the whole vocabulary). Any top_p below the
        # top token's probability (at least 1 / vocabulary) keeps that token alone, as this floor does.
        scaled = apply_top_p(scaled, max(top_p, SMALLEST_TOP_P))
    if min_p > 0.0:
        scaled = apply_min_p(scaled, min_p)
    return scaled


def make_random_sampler(key: SamplerKey) -> Sampler:
    """Draws from the truncated distribution with mlx's global random state (unseeded requests)."""

    def sample(logprobs: mx.array) -> mx.array:
        return mx.random.categorical(_truncate(logprobs, key))  # [B]

    return sample


def make_seeded_sampler(key: SamplerKey, seed: int) -> Sampler:
    """Draws from the request's own key chain: the same seed gives the same draws whatever the batch.
    mlx-lm calls a request's sampler exactly once per generated token, so the chain advances in step.
    Any int is a seed, as in the PyTorch engine: mlx's key takes 64 bits, so a negative or larger seed
    is taken modulo 2**64 (else mx.random.key raised TypeError, failing every request started with it)."""
    state = {"key": mx.random.key(seed % SEED_MODULUS)}

    def sample(logprobs: mx.array) -> mx.array:
        next_key, draw_key = mx.random.split(state["key"])
        state["key"] = next_key
        return mx.random.categorical(_truncate(logprobs, key), key=draw_key)  # [1]

    return sample


class SamplerFactory:
    """Hands out samplers; unseeded requests with equal knobs get the very same object while one of
    them runs. Kept weakly: the knobs are the client's (any temperature), so a server kept one sampler
    for every value it was ever sent."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._shared: weakref.WeakValueDictionary[SamplerKey, Sampler] = weakref.WeakValueDictionary()

    def sampler_for(self, params: SamplingParams, seed: int | None) -> Sampler:
        if params.greedy:
            return greedy_sample
        # A top-k covering the vocabulary keeps everything (mlx-lm's top-k rejects it).
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else 0
        key: SamplerKey = (params.temperature, top_k, params.top_p, params.min_p)
        if seed is not None:
            return make_seeded_sampler(key, seed)
        sampler = self._shared.get(key)
        if sampler is None:
            sampler = self._shared[key] = make_random_sampler(key)
        return sampler


def logits_processors(
    params: SamplingParams, prompt_len: int, eos_token_ids: Sequence[int]
) -> list[LogitsProcessor]:
    """The processors a request needs, in the PyTorch engine's order (empty for plain requests).

    mlx-lm passes each processor the tokens in the KV cache plus the newest one: the prompt, then
    the output so far, so len(context) - prompt_len tokens have been generated.
    """
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(_logit_bias(params.logit_bias))
    banned = banned_until_min_tokens(params, eos_token_ids)
    if params.min_tokens > 0 and banned:
        processors.append(_min_tokens_ban(banned, params.min_tokens, prompt_len))
    if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
        processors.append(_penalties(params, prompt_len))
    return processors


def banned_until_min_tokens(params: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    banned = set(params.stop_token_ids)
    if not params.ignore_eos:
        banned.update(eos_token_ids)
    return sorted(banned)


def _logit_bias(bias: dict[int, float]) -> LogitsProcessor:
    token_ids = mx.array(list(bias.keys()))  # [N]
    values = mx.array(list(bias.values()), dtype=mx.float32)  # [N]

    def add_bias(context: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, token_ids].add(values.astype(logits.dtype))

    return add_bias


def _min_tokens_ban(banned: list[int], min_tokens: int, prompt_len: int) -> LogitsProcessor:
    banned_ids = mx.array(banned)  # [N]

    def ban(context: mx.array, logits: mx.array) -> mx.array:
        if context.size - prompt_len >= min_tokens:
            return logits
        logits[:, banned_ids] = -float("inf")
        return logits

    return ban


def _penalties(params: SamplingParams, prompt_len: int) -> LogitsProcessor:
    """Repetition (Hugging Face; prompt and output) then presence / frequency (OpenAI; output only)."""
    repetition, presence, frequency = (
        params.repetition_penalty,
        params.presence_penalty,
        params.frequency_penalty,
    )

    def penalize(context: mx.array, logits: mx.array) -> mx.array:
        if repetition != 1.0 and context.size:
            seen = logits[:, context]  # [1, T]; duplicates read and write the same value
            logits[:, context] = mx.where(seen > 0, seen / repetition, seen * repetition)
        output = context[prompt_len:]  # [O]
        if output.size == 0:
            return logits
        if frequency:
            # .at[].subtract accumulates over duplicates: the penalty scales with the count.
            logits = logits.at[:, output].subtract(mx.array(frequency, dtype=logits.dtype))
        if presence:
            logits[:, output] = logits[:, output] - presence
        return logits

    return penalize


class RawLogprobsRecorder:
    """A first processor that keeps log_softmax of the unprocessed logits, so reported logprobs come from
    the model's raw distribution even when processors change the one sampled from. mlx-lm computes a
    request's next logits before reporting its current token, so records queue up first in, first out."""

    def __init__(self) -> None:
        self._pending: list[mx.array] = []

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        self._pending.append((logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0])  # [V]
        return logits

    def pop(self) -> mx.array:
        return self._pending.pop(0)


def stop_sequences(
    params: SamplingParams, eos_token_ids: Sequence[int], cache: MutableMapping[Any, StopSequences]
) -> StopSequences:
    """Single-token stop sequences: EOS (unless ignore_eos) and stop_token_ids; automata are shared
    through `cache` (a WeakValueDictionary in the loop: the client picks stop_token_ids)."""
    tokens = set(params.stop_token_ids)
    if not params.ignore_eos:
        tokens.update(eos_token_ids)
    key = tuple(sorted(tokens))
    found = cache.get(key)
    if found is None:
        found = cache[key] = StopSequences([(token,) for token in key])
    return found
