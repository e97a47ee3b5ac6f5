"""Host-side plan of one sampler call: which logit processors run, and their inputs as flat lists."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from batchlm.sampling.state import SamplingState


@dataclass
class SamplingPlan:
    """What one batch needs, gathered in a single pass over its states (no device work)."""

    # Rows sampled at temperature > 0 (the others take the argmax).
    random_rows: list[int] = field(default_factory=list)
    # The random rows whose request has its own generator (a seed).
    seeded_rows: list[int] = field(default_factory=list)
    # Largest `logprobs` asked for in the batch; None when no row asks.
    max_logprobs: int | None = None
    # logit_bias entries flattened over the batch: row, token id, additive bias.
    bias_rows: list[int] = field(default_factory=list)
    bias_token_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    # Tokens forced to -inf because their row has not reached min_tokens yet: row, token id.
    banned_rows: list[int] = field(default_factory=list)
    banned_token_ids: list[int] = field(default_factory=list)
    # Rows with a repetition, presence or frequency penalty.
    penalty_rows: list[int] = field(default_factory=list)
    # Filters used by at least one random row; the largest top-k among them.
    max_top_k: int = 0
    any_top_p: bool = False
    any_min_p: bool = False

    @property
    def all_greedy(self) -> bool:
        return not self.random_rows

    @property
    def changes_logits(self) -> bool:
        return bool(self.bias_rows or self.banned_rows or self.penalty_rows)

    @property
    def varies_by_step(self) -> bool:
        """True when the same batch may need a different plan next step (min_tokens bans lapse as
        tokens are generated); everything else in a plan is fixed by the requests' parameters."""
        return bool(self.banned_rows)

    def add(self, row: int, state: SamplingState, vocab_size: int) -> None:
        params = state.params
        if not params.greedy:
            self.random_rows.append(row)
            if state.generator is not None:
                self.seeded_rows.append(row)
            if params.top_k > 0:
                self.max_top_k = max(self.max_top_k, min(params.top_k, vocab_size))
            self.any_top_p = self.any_top_p or params.top_p < 1.0
            self.any_min_p = self.any_min_p or params.min_p > 0.0
        if params.logprobs is not None:
            self.max_logprobs = max(self.max_logprobs or 0, params.logprobs)
        if params.logit_bias:
            self._add_bias(row, state, vocab_size)
        if state.num_generated < params.min_tokens:
            self._add_min_tokens_ban(row, state, vocab_size)
        if has_penalty(state):
            self.penalty_rows.append(row)

    def _add_bias(self, row: int, state: SamplingState, vocab_size: int) -> None:
        bias = state.params.logit_bias
        # The input processor refused the request otherwise: one bad row must not fail the batch.
        assert all(0 <= token_id < vocab_size for token_id in bias), "logit_bias ids were not validated"
        self.bias_rows.extend([row] * len(bias))
        self.bias_token_ids.extend(bias.keys())
        self.bias_values.extend(bias.values())

    def _add_min_tokens_ban(self, row: int, state: SamplingState, vocab_size: int) -> None:
        banned = set(state.params.stop_token_ids)
        if not state.params.ignore_eos:
            banned.update(state.eos_token_ids)
        # Ids past the vocabulary can never be sampled, so they need no mask.
        in_vocab = [token_id for token_id in banned if token_id < vocab_size]
        self.banned_rows.extend([row] * len(in_vocab))
        self.banned_token_ids.extend(in_vocab)


def has_penalty(state: SamplingState) -> bool:
    params = state.params
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


def plan_batch(states: Sequence[SamplingState], vocab_size: int) -> SamplingPlan:
    plan = SamplingPlan()
    for row, state in enumerate(states):
        plan.add(row, state, vocab_size)
    return plan


def to_device(
    values: Sequence[int] | Sequence[float] | Sequence[Sequence[float]],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Copy host values to `device` without waiting on the device (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype, pin_memory=True)
    return staged.to(device, non_blocking=True)
