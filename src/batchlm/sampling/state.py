"""Per-request sampling state that the model runner keeps for each running sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from batchlm.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass
class TokenStats:
    """Device-side token statistics of one request, kept up to date incrementally by the sampler.

    Only requests with a repetition, presence or frequency penalty get one. The tensors may be row
    views of a batch-wide tensor from the previous sampler call (see penalties.collect_token_stats).
    """

    # [V] int32: how often each token id occurs in output_token_ids[:num_counted].
    output_counts: torch.Tensor
    # [V] bool: which token ids occur in the prompt (for the repetition penalty).
    prompt_mask: torch.Tensor
    # Number of output tokens already folded into output_counts.
    num_counted: int


@dataclass
class SamplingState:
    """One running request as the sampler sees it; owned by the runner, which appends each sampled
    token to `output_token_ids` before the next call.

    A seeded request draws its noise only from `generator`, re-seeded before every token from
    (seed, number of tokens generated so far): its tokens depend on neither its batch-mates nor its
    batch position, and a request recreated after preemption continues exactly where it left off.
    """

    params: SamplingParams
    # Private generator of a seeded request (on the logits' device); None = the sampler's shared one.
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # Tokens that end generation; masked (unless ignore_eos) until min_tokens are generated.
    eos_token_ids: tuple[int, ...]
    # The seed `generator` was created from (None when unseeded).
    seed: int | None = None
    # Penalty bookkeeping, created and updated by the sampler; None until first needed.
    token_stats: TokenStats | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        seed: int | None,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        eos_token_ids: Sequence[int],
        device: torch.device | str,
    ) -> SamplingState:
        """Build the state for a new (or re-admitted after preemption) request.

        A list passed as output_token_ids is kept as is (not copied), so a runner may share it."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=resolve_device(device))
            generator.manual_seed(seed_for_step(seed, 0))
        outputs = output_token_ids if isinstance(output_token_ids, list) else list(output_token_ids)
        return cls(
            params=params,
            generator=generator,
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=outputs,
            eos_token_ids=tuple(eos_token_ids),
            seed=seed,
        )

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids)

    def generator_for_next_token(self) -> torch.Generator | None:
        """The private generator, re-seeded for the token about to be sampled (None if unseeded).

        A generator handed in without a seed (built by hand) is used as is: batch-invariant, but a
        preempted request then restarts its stream."""
        if self.generator is not None and self.seed is not None:
            self.generator.manual_seed(seed_for_step(self.seed, self.num_generated))
        return self.generator


def resolve_device(device: torch.device | str) -> torch.device:
    """The device with its index filled in ("cuda" -> "cuda:N"), so devices compare like with like."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def seed_for_step(seed: int, step: int) -> int:
    """Mix a request seed and a token index into a 63-bit generator seed (splitmix64 finaliser), so
    nearby seeds and steps give unrelated streams."""
    value = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) >> 1
