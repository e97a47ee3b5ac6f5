"""Tests for batchlm.backends.mlx.sampling and .logprobs: the MLX processors match the PyTorch engine's
formulas, samplers are shared or private as promised, seeds reproduce, logprobs are ranked correctly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchlm.backends.mlx  # noqa: F401  (first: it imports mlx-lm, keeping the open-file limit)

mx = pytest.importorskip("mlx.core")

from batchlm.backends.mlx.logprobs import LogprobsQuery, token_logprobs  # noqa: E402
from batchlm.backends.mlx.sampling import (  # noqa: E402
    RawLogprobsRecorder,
    SamplerFactory,
    greedy_sample,
    logits_processors,
    stop_sequences,
)
from batchlm.sampling import Sampler, SamplingState  # noqa: E402
from batchlm.sampling_params import SamplingParams  # noqa: E402

VOCAB = 12
EOS = (2,)
LOGITS_ROW = [1.5, -2.0, 0.5, 3.0, -0.5, 0.0, 2.0, -1.0, 4.0, -3.0, 1.0, 0.25]


def run_processors(params: SamplingParams, prompt: list[int], outputs: list[int]) -> list[float]:
    """Apply the MLX processors the way mlx-lm does: context = prompt + outputs so far."""
    logits = mx.array([LOGITS_ROW])
    context = mx.array(prompt + outputs, dtype=mx.int32)
    for processor in logits_processors(params, len(prompt), EOS):
        logits = processor(context, logits)
    return logits[0].tolist()


def torch_reference(params: SamplingParams, prompt: list[int], outputs: list[int]) -> list[float]:
    state = SamplingState.create(params, None, prompt, outputs, EOS, torch.device("cpu"))
    processed = Sampler(VOCAB, "cpu").process_logits(torch.tensor([LOGITS_ROW]), [state])
    return processed[0].tolist()


def test_plain_requests_need_no_processors() -> None:
    assert logits_processors(SamplingParams(temperature=0.7, top_p=0.9), 3, EOS) == []


def test_repetition_penalty_matches_the_torch_engine() -> None:
    params = SamplingParams(repetition_penalty=2.0)
    got = run_processors(params, prompt=[0, 1], outputs=[3, 4, 4])
    expected = list(LOGITS_ROW)
    expected[0], expected[1], expected[3], expected[4] = 0.75, -4.0, 1.5, -1.0
    assert got == pytest.approx(expected)
    assert got == pytest.approx(torch_reference(params, [0, 1], [3, 4, 4]))


def test_presence_and_frequency_count_output_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = run_processors(params, prompt=[0, 3], outputs=[3, 6, 6, 6])
    expected = list(LOGITS_ROW)
    expected[3] -= 0.5 + 0.25
    expected[6] -= 0.5 + 0.25 * 3
    assert got == pytest.approx(expected, abs=1e-6)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[5])
    early = run_processors(params, prompt=[0], outputs=[7])
    assert early[2] == -math.inf and early[5] == -math.inf
    assert early[3] == LOGITS_ROW[3]
    assert run_processors(params, prompt=[0], outputs=[7, 8]) == pytest.approx(LOGITS_ROW)


def test_min_tokens_with_ignore_eos_leaves_eos_alone() -> None:
    params = SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[5])
    got = run_processors(params, prompt=[0], outputs=[])
    assert got[2] == LOGITS_ROW[2] and got[5] == -math.inf


@settings(max_examples=40, deadline=None)
@given(
    repetition=st.floats(0.5, 2.0),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
    bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=3),
    min_tokens=st.integers(0, 3),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6),
    outputs=st.lists(st.integers(0, VOCAB - 1), max_size=6),
)
def test_processors_match_the_torch_sampler(
    repetition: float,
    presence: float,
    frequency: float,
    bias: dict[int, float],
    min_tokens: int,
    prompt: list[int],
    outputs: list[int],
) -> None:
    params = SamplingParams(
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        logit_bias=bias,
        min_tokens=min_tokens,
        max_tokens=16,
    )
    got = run_processors(params, prompt, outputs)
    expected = torch_reference(params, prompt, outputs)
    for value, reference in zip(got, expected, strict=True):
        if math.isinf(reference):
            assert value == reference
        else:
            assert value == pytest.approx(reference, rel=1e-5, abs=1e-4)


def test_unseeded_samplers_with_equal_knobs_are_shared() -> None:
    factory = SamplerFactory(VOCAB)
    first = factory.sampler_for(SamplingParams(temperature=0.7, top_k=5), None)
    assert factory.sampler_for(SamplingParams(temperature=0.7, top_k=5), None) is first
    assert factory.sampler_for(SamplingParams(temperature=0.8, top_k=5), None) is not first
    assert factory.sampler_for(SamplingParams(temperature=0.7, top_k=5), 3) is not first
    assert factory.sampler_for(SamplingParams(temperature=0.0), None) is greedy_sample


def logprobs_of(probs: list[float]) -> mx.array:
    return mx.log(mx.array([probs]))


def test_truncation_to_one_token_always_picks_the_most_likely() -> None:
    factory = SamplerFactory(4)
    logprobs = logprobs_of([0.1, 0.2, 0.4, 0.3])
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.05), SamplingParams(min_p=0.9)):
        sampler = factory.sampler_for(params, None)
        assert {sampler(logprobs).item() for _ in range(20)} == {2}


@pytest.mark.parametrize("seed", [None, 3])
def test_top_p_below_float32_range_picks_the_most_likely(seed: int | None) -> None:
    # 1e-50 is a valid top_p but 0 in float32: mlx-lm's top-p then masked nothing it should keep and
    # drew from the whole vocabulary.
    logprobs = logprobs_of([0.1, 0.2, 0.4, 0.3])
    for top_p in (1e-50, 5e-324):
        sampler = SamplerFactory(4).sampler_for(SamplingParams(top_p=top_p), seed)
        assert {sampler(logprobs).item() for _ in range(20)} == {2}


def test_top_k_covering_the_vocabulary_is_accepted() -> None:
    sampler = SamplerFactory(4).sampler_for(SamplingParams(top_k=4), None)
    assert 0 <= sampler(logprobs_of([0.25] * 4)).item() < 4


def test_sampling_draws_only_tokens_with_mass_and_all_of_them() -> None:
    sampler = SamplerFactory(4).sampler_for(SamplingParams(temperature=1.0), 0)
    drawn = {sampler(logprobs_of([0.5, 0.5, 0.0, 0.0])).item() for _ in range(60)}
    assert drawn == {0, 1}


def test_seeded_sampler_repeats_its_draws_and_seeds_differ() -> None:
    factory = SamplerFactory(8)
    logprobs = logprobs_of([1 / 8] * 8)

    def draws(seed: int) -> list[int]:
        sampler = factory.sampler_for(SamplingParams(temperature=1.0), seed)
        return [sampler(logprobs).item() for _ in range(16)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("seed", [-1, -(2**63) - 1, 2**64, 10**30])
def test_any_integer_seed_samples_as_its_64_bit_residue(seed: int) -> None:
    # The API takes any integer seed (the PyTorch engine mixes it in modulo 2**64); mlx's key raised
    # TypeError outside [0, 2**64), which failed the request and every one started beside it.
    factory = SamplerFactory(8)
    logprobs = logprobs_of([1 / 8] * 8)

    def draws(seed: int) -> list[int]:
        sampler = factory.sampler_for(SamplingParams(temperature=1.0), seed)
        return [sampler(logprobs).item() for _ in range(16)]

    assert draws(seed) == draws(seed % 2**64)


def test_recorder_returns_raw_logprobs_first_in_first_out() -> None:
    recorder = RawLogprobsRecorder()
    first, second = mx.array([[0.0, 1.0]]), mx.array([[2.0, 0.0]])
    assert recorder(mx.array([1]), first) is first
    recorder(mx.array([1]), second)
    assert recorder.pop().tolist() == pytest.approx([-1.3132616, -0.3132616])
    assert recorder.pop().tolist() == pytest.approx([-0.126928, -2.126928], abs=1e-6)


def test_stop_sequences_follow_ignore_eos_and_are_shared() -> None:
    cache: dict = {}
    plain = stop_sequences(SamplingParams(stop_token_ids=[9]), EOS, cache)
    assert stop_sequences(SamplingParams(stop_token_ids=[9]), EOS, cache) is plain
    matcher = plain.matcher()
    assert not matcher.advance(4) and matcher.advance(2)
    ignoring = stop_sequences(SamplingParams(ignore_eos=True, stop_token_ids=[9]), EOS, cache).matcher()
    assert not ignoring.advance(2) and ignoring.advance(9)


def test_token_logprobs_rank_and_order_the_top_alternatives() -> None:
    vector = mx.log(mx.array([0.1, 0.4, 0.2, 0.3]))
    results = token_logprobs([LogprobsQuery(vector, 2, 3), LogprobsQuery(vector, 1, 0)])
    assert results[0].rank == 3
    assert results[0].logprob == pytest.approx(math.log(0.2))
    assert [token for token, _ in results[0].top] == [1, 3, 2]
    assert results[0].top[0][1] == pytest.approx(math.log(0.4))
    assert results[1].rank == 1 and results[1].top == ()
    assert token_logprobs([]) == []
