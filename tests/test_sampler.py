"""Tests for batchlm.sampling.sampler: each sampling parameter changes what the Sampler draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchlm.core.facts import ModelFacts
from batchlm.engine.client import RequestRejectedError
from batchlm.engine.input_processor import InputProcessor
from batchlm.sampling import Sampler, SamplingState
from batchlm.sampling_params import SamplingParams
from batchlm.structured.step_masks import GrammarMasks

EOS = 2
CPU = torch.device("cpu")


def make_state(
    params: SamplingParams | None = None,
    seed: int | None = None,
    prompt: tuple[int, ...] = (1,),
    outputs: tuple[int, ...] = (),
    device: torch.device = CPU,
) -> SamplingState:
    return SamplingState.create(params or SamplingParams(), seed, prompt, outputs, (EOS,), device)


def draw_counts(
    logits_row: list[float], params: SamplingParams, num_draws: int, seed: int = 0
) -> torch.Tensor:
    """Token frequencies of num_draws unseeded draws from one distribution (one batched call)."""
    logits = torch.tensor([logits_row]).repeat(num_draws, 1)
    sampler = Sampler(len(logits_row), CPU, seed=seed)
    out = sampler(logits, [make_state(params) for _ in range(num_draws)])
    return torch.bincount(out.token_ids, minlength=len(logits_row)).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic over the tokens with non-zero expected probability."""
    expected = probs.double() * counts.sum()
    support = expected > 0
    return float((((counts - expected) ** 2)[support] / expected[support]).sum())


# 99.9% quantile of chi-square with 5 degrees of freedom: a correct sampler exceeds it 0.1% of the
# time; the draws are seeded, so the outcome is fixed.
CHI2_CRIT_DF5 = 20.5
SIX_LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -2.0]
FOUR_PROBS = [0.5, 0.3, 0.15, 0.05]
FOUR_LOGITS = [math.log(p) for p in FOUR_PROBS]


def test_temperature_zero_takes_argmax() -> None:
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    states = [make_state(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = Sampler(50, CPU)(logits, states)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist() == out.token_ids_cpu
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs == [None] * 8


def test_greedy_rows_take_argmax_beside_random_rows() -> None:
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    states = [make_state(SamplingParams(temperature=0.0 if i % 2 else 1.5)) for i in range(6)]
    out = Sampler(40, CPU)(logits, states)
    assert out.token_ids[1::2].tolist() == logits[1::2].argmax(-1).tolist()


@pytest.mark.parametrize(
    "filters", [{}, {"top_p": 0.9}, {"min_p": 0.1}, {"top_k": 5}, {"top_p": 0.9, "logprobs": 2}]
)
@pytest.mark.parametrize("temperature", [1e-40, 1e-6])
def test_a_vanishing_temperature_takes_the_argmax(temperature: float, filters: dict[str, float]) -> None:
    # Logits divided by such a temperature overflow to infinities, whose softmax is NaN.
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 4
    states = [make_state(SamplingParams(temperature=temperature, **filters)) for _ in range(4)]
    out = Sampler(300, CPU)(logits, states)
    assert out.token_ids_cpu == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_scaled_softmax(temperature: float) -> None:
    counts = draw_counts(SIX_LOGITS, SamplingParams(temperature=temperature), 20000)
    expected = torch.softmax(torch.tensor(SIX_LOGITS) / temperature, -1)
    assert chi_square(counts, expected) < CHI2_CRIT_DF5
    if temperature != 1.0:
        # The same draws are far from the unscaled distribution: temperature was not ignored.
        assert chi_square(counts, torch.softmax(torch.tensor(SIX_LOGITS), -1)) > 10 * CHI2_CRIT_DF5


def test_top_k_one_is_greedy() -> None:
    logits = torch.randn(16, 30, generator=torch.Generator().manual_seed(3))
    states = [make_state(SamplingParams(temperature=1.0, top_k=1), seed=i) for i in range(16)]
    out = Sampler(30, CPU)(logits, states)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_limits_support_to_k_most_likely() -> None:
    counts = draw_counts(SIX_LOGITS, SamplingParams(top_k=3), 6000)
    assert counts[3:].sum() == 0
    expected = torch.softmax(torch.tensor(SIX_LOGITS[:3]), -1)
    assert chi_square(counts[:3], expected) < CHI2_CRIT_DF5


@pytest.mark.parametrize(("top_p", "support"), [(0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, support: int) -> None:
    counts = draw_counts(FOUR_LOGITS, SamplingParams(top_p=top_p), 6000)
    assert (counts[:support] > 0).all()
    assert counts[support:].sum() == 0
    renormalised = torch.tensor(FOUR_PROBS[:support]) / sum(FOUR_PROBS[:support])
    assert chi_square(counts[:support], renormalised) < CHI2_CRIT_DF5


def test_top_p_acts_after_top_k() -> None:
    # After top_k=2 the renormalised top token has 0.4/0.75 > 0.5, so top_p=0.5 keeps it alone;
    # on the untruncated distribution top_p=0.5 would keep two tokens.
    logits = [math.log(p) for p in (0.4, 0.35, 0.25)]
    assert draw_counts(logits, SamplingParams(top_p=0.5), 2000)[1] > 0
    counts = draw_counts(logits, SamplingParams(top_k=2, top_p=0.5), 2000)
    assert counts.tolist() == [2000, 0, 0]


@pytest.mark.parametrize(("min_p", "support"), [(0.2, 3), (0.5, 2), (0.7, 1), (0.0, 4)])
def test_min_p_drops_tokens_below_fraction_of_top(min_p: float, support: int) -> None:
    counts = draw_counts(FOUR_LOGITS, SamplingParams(min_p=min_p), 6000)
    assert (counts[:support] > 0).all()
    assert counts[support:].sum() == 0


def test_min_p_is_relative_to_tempered_distribution() -> None:
    # At temperature 2 the probabilities flatten to ~[0.39, 0.30, 0.21, 0.11]: min_p=0.5 keeps three.
    counts = draw_counts(FOUR_LOGITS, SamplingParams(min_p=0.5, temperature=2.0), 4000)
    assert (counts[:3] > 0).all()
    assert counts[3] == 0


def test_logit_bias_forces_and_forbids_tokens() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, -3.0]]).repeat(200, 1)
    force = SamplingParams(temperature=1.0, logit_bias={3: 100.0})
    forbid = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    out = Sampler(4, CPU)(logits[:2], [make_state(force), make_state(forbid)])
    assert out.token_ids.tolist() == [3, 1]
    forbid_random = SamplingParams(temperature=5.0, logit_bias={0: -100.0})
    drawn = Sampler(4, CPU)(logits, [make_state(forbid_random) for _ in range(200)]).token_ids
    assert 0 not in drawn.tolist()


def test_logit_bias_outside_vocabulary_is_rejected() -> None:
    # At the edge, naming the field; the step only asserts what the edge guarantees.
    params = SamplingParams(logit_bias={10: 1.0})
    with pytest.raises(RequestRejectedError, match="Token id 10") as info:
        InputProcessor(ModelFacts(max_model_len=16, vocab_size=10)).process([1], params)
    assert info.value.param == "logit_bias"
    with pytest.raises(AssertionError):
        Sampler(10, CPU)(torch.zeros(1, 10), [make_state(params)])


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    # EOS (2) is the clear favourite, then stop token 5, then token 7.
    logits = torch.full((1, 10), -5.0)
    logits[0, EOS], logits[0, 5], logits[0, 7] = 9.0, 8.0, 7.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    sampler = Sampler(10, CPU)
    assert sampler(logits, [make_state(params, outputs=(4, 4))]).token_ids_cpu == [7]
    assert sampler(logits, [make_state(params, outputs=(4, 4, 4))]).token_ids_cpu == [EOS]
    ignore = params.clone(ignore_eos=True)
    assert sampler(logits, [make_state(ignore, outputs=(4,))]).token_ids_cpu == [EOS]
    masked = sampler.process_logits(logits, [make_state(ignore, outputs=(4,))])
    assert masked[0, 5] == float("-inf")
    assert masked[0, EOS] == 9.0


def test_seeded_tokens_ignore_batch_mates_and_position() -> None:
    gen = torch.Generator().manual_seed(4)
    steps = [torch.randn(1, 64, generator=gen) for _ in range(12)]
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def run(num_mates: int, position: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(64, CPU, seed=sampler_seed)
        mine = make_state(params, seed=1234)
        mates = [make_state(params, seed=None if i % 2 else 99 + i) for i in range(num_mates)]
        states = [*mates[:position], mine, *mates[position:]]
        for step_logits in steps:
            logits = torch.randn(len(states), 64, generator=gen)
            logits[position] = step_logits[0]
            out = sampler(logits, states)
            for state, token in zip(states, out.token_ids_cpu, strict=True):
                state.output_token_ids.append(token)
        return mine.output_token_ids

    alone = run(0, 0, sampler_seed=0)
    assert run(5, 0, sampler_seed=1) == alone
    assert run(5, 5, sampler_seed=2) == alone
    assert run(7, 3, sampler_seed=3) == alone
    assert len(set(alone)) > 3  # a real random stream, not a constant


def test_different_seeds_give_different_tokens() -> None:
    logits = torch.zeros(3, 1000)  # uniform: any two streams collide with probability 1e-3 per draw
    states = [make_state(seed=s) for s in (1, 2, 1)]
    sampler = Sampler(1000, CPU)
    draws = [sampler(logits, states).token_ids_cpu for _ in range(5)]
    assert [d[0] for d in draws] != [d[1] for d in draws]
    # The two seed-1 states share a stream (outputs empty, so both stay at step 0).
    assert all(d[0] == d[2] for d in draws)


def test_seeded_request_resumes_after_preemption() -> None:
    logits = torch.zeros(1, 500)
    sampler = Sampler(500, CPU)
    state = make_state(seed=42)
    for _ in range(6):
        state.output_token_ids.append(sampler(logits, [state]).token_ids_cpu[0])
    recreated = make_state(seed=42, outputs=tuple(state.output_token_ids[:3]))
    for _ in range(3):
        recreated.output_token_ids.append(sampler(logits, [recreated]).token_ids_cpu[0])
    assert recreated.output_token_ids == state.output_token_ids


def test_unseeded_rows_use_the_sampler_seed() -> None:
    logits = torch.zeros(8, 1000)
    first = Sampler(1000, CPU, seed=1)(logits, [make_state() for _ in range(8)]).token_ids_cpu
    again = Sampler(1000, CPU, seed=1)(logits, [make_state() for _ in range(8)]).token_ids_cpu
    other = Sampler(1000, CPU, seed=2)(logits, [make_state() for _ in range(8)]).token_ids_cpu
    assert first == again
    assert first != other


def test_logprobs_come_from_raw_logits_with_ranks_and_sorted_top() -> None:
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.7, logprobs=5, presence_penalty=2.0, logit_bias={3: 4.0}),
        SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=2.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=3.0, top_k=4, logprobs=2),
    ]
    states = [make_state(p, seed=i, prompt=(3, 4), outputs=(5, 6)) for i, p in enumerate(params)]
    out = Sampler(32, CPU)(logits, states)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for row, wanted in ((0, 5), (1, 0), (3, 2)):
        entry = out.logprobs[row]
        assert entry is not None
        token = out.token_ids_cpu[row]
        assert entry.logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[row] > raw[row, token]).sum())
        expected_ids = raw[row].argsort(descending=True)[:wanted].tolist()
        assert [t for t, _ in entry.top] == expected_ids
        assert [v for _, v in entry.top] == pytest.approx(raw[row, expected_ids].tolist(), abs=1e-6)


def test_padded_vocab_columns_are_never_sampled() -> None:
    logits = torch.zeros(300, 12)
    logits[:, 10:] = 1000.0  # padding columns that would win every draw
    states = [make_state(SamplingParams(temperature=0.0 if i == 0 else 1.0, logprobs=3)) for i in range(300)]
    out = Sampler(10, CPU)(logits, states)
    assert max(out.token_ids_cpu) < 10
    first = out.logprobs[0]
    assert first is not None
    assert first.logprob == pytest.approx(-math.log(10), abs=1e-6)
    assert all(token < 10 for token, _ in first.top)


def test_caller_logits_are_not_modified() -> None:
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(6))
    before = logits.clone()
    params = SamplingParams(
        temperature=0.5, top_p=0.5, min_p=0.1, repetition_penalty=1.5, logit_bias={1: 3.0}
    )
    Sampler(20, CPU)(logits, [make_state(params, outputs=(1, 2)), make_state(params, seed=3)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
        SamplingParams(temperature=0.0, logit_bias={3: 2.5}),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, logprobs=2),
    ],
    ids=["greedy", "random", "filtered", "biased", "penalized-logprobs"],
)
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "masked"])
def test_half_precision_logits_sample_as_their_float32_widening(
    params: SamplingParams, constrained: bool
) -> None:
    # A model's bf16 logits reach the sampler as they are: rows that need no processing are read
    # raw, the rest widened first. Either way the draw is that of the widened logits.
    logits = (torch.randn(6, 40, generator=torch.Generator().manual_seed(8)) * 4).bfloat16()
    before = logits.clone()
    # Rows 1 and 4 may take only tokens 0-7 and 33-39.
    allowed = np.zeros((2, 2), dtype=np.int32)
    allowed[:, 0], allowed[:, 1] = 0xFF, np.int32(-2)  # bits 0-7; bits 1-31
    grammar = GrammarMasks((1, 4), allowed) if constrained else None

    def draw(batch: torch.Tensor) -> tuple[list[int], list[object]]:
        states = [make_state(params, seed=row if row % 2 else None, outputs=(3, 5)) for row in range(6)]
        out = Sampler(40, CPU, seed=1)(batch, states, grammar)
        return out.token_ids_cpu, [None if lp is None else (lp.logprob, lp.top) for lp in out.logprobs]

    tokens, logprobs = draw(logits)
    assert (tokens, logprobs) == draw(logits.float())
    assert torch.equal(logits, before)
    if constrained:
        assert all(tokens[row] < 8 or tokens[row] >= 33 for row in (1, 4))


def test_shape_and_device_errors_name_the_problem() -> None:
    sampler = Sampler(10, CPU)
    with pytest.raises(ValueError, match="num_states=2"):
        sampler(torch.zeros(1, 10), [make_state(), make_state()])
    with pytest.raises(ValueError, match="vocab_size=10"):
        sampler(torch.zeros(1, 8), [make_state()])
    with pytest.raises(ValueError, match="meta"):
        sampler(torch.zeros(1, 10, device="meta"), [make_state()])
    with pytest.raises(ValueError, match="vocab_size must be"):
        Sampler(0, CPU)


def test_empty_batch() -> None:
    out = Sampler(10, CPU)(torch.zeros(0, 10), [])
    assert out.token_ids_cpu == []
    assert out.logprobs == []


@pytest.mark.gpu
def test_cuda_sampling_never_waits_on_the_device_and_is_batch_invariant() -> None:
    device = torch.device("cuda")
    sampler = Sampler(1000, device)
    params = SamplingParams(
        temperature=0.8,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        logit_bias={7: 2.0},
        min_tokens=4,
        stop_token_ids=[9],
        logprobs=5,
    )
    states = [make_state(params, seed=i, prompt=(3, 4, 5), outputs=(6,), device=device) for i in range(64)]
    states[1] = make_state(SamplingParams(temperature=0.0), device=device)
    logits = torch.randn(64, 1024, device=device, generator=torch.Generator(device).manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token_ids, packed = sampler.sample_on_device(logits, states)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert packed is not None
    alone = Sampler(1000, device)(
        logits[5:6], [make_state(params, seed=5, prompt=(3, 4, 5), outputs=(6,), device=device)]
    )
    assert alone.token_ids_cpu[0] == token_ids[5].item()
    assert token_ids[1].item() == logits[1, :1000].argmax().item()


def test_cpu_exponential_noise_has_exponential_moments_and_follows_its_generator() -> None:
    from batchlm.sampling.sampler import fill_exponential

    draws = torch.empty(400_000)
    fill_exponential(draws, torch.Generator().manual_seed(3))
    assert bool((draws >= 0).all())
    assert abs(draws.mean().item() - 1.0) < 0.01 and abs(draws.var().item() - 1.0) < 0.02
    assert abs((draws > 2.0).float().mean().item() - math.exp(-2.0)) < 0.003  # the tail, P(E > 2)
    rows = torch.empty(2, 1000)
    fill_exponential(rows[1], torch.Generator().manual_seed(3))  # a row view is filled in place
    assert torch.equal(rows[1], draws[:1000])
