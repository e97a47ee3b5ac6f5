"""The two records every layer above the runner shares: the started model's facts and the engine's
stats snapshot. Each is made once where it is known and passed up unchanged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFacts:
    """What the runner learned once the model and its KV cache are up: the scheduler is sized from it
    and the input processor validates requests against it. The one description of the loaded model:
    an engine without a fixed KV cache (the MLX backend) gives the first two fields only."""

    # Max prompt + output tokens of one request.
    max_model_len: int
    vocab_size: int
    # The whole KV cache in blocks; 0 when the engine has no fixed cache.
    num_blocks: int = 0
    block_size: int = 16
    max_num_batched_tokens: int = 0
    device: str = ""
    dtype: str = ""
    # Bits per KV-cache element: 8 for an FP8 cache, else the model dtype's.
    kv_cache_bits: int = 0
    # Whether the engine reads the logits of every prompt token (SamplingParams.prompt_logprobs).
    computes_prompt_logprobs: bool = False
    # Phi-3's LongRoPE: a sequence of more than this many tokens rotates every position with the long
    # factors, as transformers does (layers/rotary.LongRopeSwitch); None: the model has one rotation.
    long_rope_after: int | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics and the periodic log line, as the engine (core or MLX loop) counts."""

    num_running: int = 0
    num_waiting: int = 0
    # Fraction of KV-cache blocks held by requests, 0..1 (evictable cached blocks count as free).
    kv_cache_usage: float = 0.0
    # Prefix-cache lookups and hits, in tokens, cumulative.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Requests preempted (and later recomputed), cumulative.
    num_preemptions: int = 0
    # Prompt tokens of the requests scheduled (the core counts each at its first admission: one aborted
    # while it waits adds none; the MLX backend counts them on arrival), and tokens sampled, cumulative
    # (a front end's own count would miss what other front ends sharing the engine sent).
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # Speculative decoding: draft tokens verified and accepted, and the drafts (one request's run of
    # draft tokens in one verify step) they came in, cumulative.
    spec_proposed_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_drafts_total: int = 0
    # The KV cache's size in blocks and bits per element (8: FP8), 0 where unknown.
    kv_cache_blocks: int = 0
    kv_cache_bits: int = 0
