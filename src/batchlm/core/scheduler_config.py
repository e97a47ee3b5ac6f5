"""The limits a scheduler enforces."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchlm.core.speculation import SpeculationConfig


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits the scheduler enforces; resolved once from EngineConfig and the KV-cache size."""

    # Cap on running requests (the --batch-size flag).
    max_num_seqs: int
    # Tokens computed per step, decodes and prefill chunks together.
    max_num_batched_tokens: int
    # Prompt + output tokens allowed per request.
    max_model_len: int
    # Tokens per KV-cache block.
    block_size: int
    # KV-cache blocks available (ids 0 .. num_blocks - 1).
    num_blocks: int
    # Share computed full blocks between requests with the same prefix.
    enable_prefix_caching: bool = True
    # Model/adapter identity, mixed into the first block's hash so different weights never share.
    prefix_cache_salt: str = ""
    # Speculative decoding from n-grams of each request's own tokens (off by default).
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # A sequence of more than this many tokens must have all of its KV computed with the model's long
    # rotation (ModelFacts.long_rope_after): one that grows past it is recomputed. None: no switch.
    long_rope_after: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")
        if self.long_rope_after is not None and self.long_rope_after < 1:
            raise ValueError(f"SchedulerConfig.long_rope_after must be positive, got {self.long_rope_after}")
