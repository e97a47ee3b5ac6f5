"""Tests for batchlm.sampling.state: construction and per-token reseeding of seeded requests."""

from __future__ import annotations

import torch

from batchlm.sampling import SamplingState
from batchlm.sampling.state import seed_for_step
from batchlm.sampling_params import SamplingParams


def test_create_copies_prompt_keeps_output_list_and_seeds_generator() -> None:
    prompt = [1, 2, 3]
    outputs = [4]
    state = SamplingState.create(SamplingParams(), 7, prompt, outputs, [2, 9], "cpu")
    prompt.append(5)
    assert state.prompt_token_ids == [1, 2, 3]
    assert state.output_token_ids is outputs  # the runner may append to its own list
    assert state.eos_token_ids == (2, 9)
    assert state.generator is not None and state.seed == 7
    from_tuple = SamplingState.create(SamplingParams(), None, (1,), (4, 5), (2,), "cpu")
    assert from_tuple.output_token_ids == [4, 5]
    assert from_tuple.generator is None


def test_generator_is_reseeded_from_seed_and_token_index() -> None:
    state = SamplingState.create(SamplingParams(), 11, [1], [], (2,), "cpu")
    gen = state.generator_for_next_token()
    assert gen is not None
    first = torch.rand(4, generator=gen)
    assert torch.equal(torch.rand(4, generator=state.generator_for_next_token()), first)
    state.output_token_ids.append(3)
    assert not torch.equal(torch.rand(4, generator=state.generator_for_next_token()), first)


def test_seed_for_step_separates_nearby_seeds_and_steps() -> None:
    values = {seed_for_step(seed, step) for seed in range(-50, 50) for step in range(50)}
    assert len(values) == 100 * 50
    assert all(0 <= v < 2**63 for v in values)
