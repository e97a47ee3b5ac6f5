"""Tests for batchlm.sampling.penalties: exact penalty formulas and incremental token bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlm.sampling import Sampler, SamplingState
from batchlm.sampling.penalties import collect_token_stats
from batchlm.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 12


def make_state(params: SamplingParams, prompt: list[int], outputs: list[int]) -> SamplingState:
    return SamplingState.create(params, None, prompt, outputs, (2,), CPU)


def reference_penalties(
    row: list[float], params: SamplingParams, prompt: list[int], outputs: list[int]
) -> list[float]:
    """The documented formulas, one token at a time in plain Python."""
    result = []
    for token, logit in enumerate(row):
        if token in prompt or token in outputs:
            p = params.repetition_penalty
            logit = logit / p if logit > 0 else logit * p
        count = outputs.count(token)
        logit -= params.presence_penalty * (count > 0) + params.frequency_penalty * count
        result.append(logit)
    return result


LOGITS_ROW = [1.5, -2.0, 0.5, 3.0, -0.5, 0.0, 2.0, -1.0, 4.0, -3.0, 1.0, 0.25]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    params = SamplingParams(repetition_penalty=2.0)
    state = make_state(params, prompt=[0, 1], outputs=[3, 4, 4])
    processed = Sampler(VOCAB, CPU).process_logits(torch.tensor([LOGITS_ROW]), [state])[0]
    expected = list(LOGITS_ROW)
    expected[0], expected[1], expected[3], expected[4] = 0.75, -4.0, 1.5, -1.0
    assert processed.tolist() == expected


def test_presence_and_frequency_penalise_output_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    state = make_state(params, prompt=[0, 3], outputs=[3, 6, 6, 6])
    processed = Sampler(VOCAB, CPU).process_logits(torch.tensor([LOGITS_ROW]), [state])[0]
    expected = list(LOGITS_ROW)
    expected[3] -= 0.5 + 0.25 * 1
    expected[6] -= 0.5 + 0.25 * 3
    assert processed.tolist() == pytest.approx(expected, abs=1e-6)
    assert processed[0] == LOGITS_ROW[0]  # prompt-only token: untouched


def test_negative_presence_penalty_encourages_repeats() -> None:
    params = SamplingParams(temperature=0.0, presence_penalty=-2.0)
    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = Sampler(4, CPU)(logits, [SamplingState.create(params, None, [0], [3], (2,), CPU)])
    assert out.token_ids_cpu == [3]


def test_penalty_flips_greedy_choice_through_the_sampler() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    out = Sampler(4, CPU)(logits, [make_state(params, prompt=[0], outputs=[])])
    assert out.token_ids_cpu == [1]


def test_only_penalised_rows_change() -> None:
    logits = torch.tensor([LOGITS_ROW] * 3)
    states = [
        make_state(SamplingParams(), prompt=[0, 3], outputs=[3, 8]),
        make_state(SamplingParams(frequency_penalty=1.0), prompt=[0], outputs=[8, 8]),
        make_state(SamplingParams(logit_bias={5: 1.0}), prompt=[3], outputs=[3]),
    ]
    processed = Sampler(VOCAB, CPU).process_logits(logits, states)
    assert processed[0].tolist() == LOGITS_ROW
    assert processed[1, 8] == LOGITS_ROW[8] - 2.0
    assert processed[2].tolist() == [*LOGITS_ROW[:5], 1.0, *LOGITS_ROW[6:]]


def test_incremental_counts_match_a_fresh_state_each_step() -> None:
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3)
    sampler = Sampler(VOCAB, CPU)
    logits = torch.tensor([LOGITS_ROW, LOGITS_ROW])
    kept = make_state(params, prompt=[1, 2], outputs=[5])
    other = make_state(params.clone(frequency_penalty=1.0), prompt=[7], outputs=[])
    for new_tokens in ([5], [9, 9], [], [0]):
        kept.output_token_ids.extend(new_tokens)
        other.output_token_ids.append(11)
        processed = sampler.process_logits(logits, [kept, other])
        fresh = make_state(params, prompt=[1, 2], outputs=list(kept.output_token_ids))
        assert torch.equal(processed[0], sampler.process_logits(logits[:1], [fresh])[0])
        stats = kept.token_stats
        assert stats is not None and stats.num_counted == len(kept.output_token_ids)
        expected_counts = torch.bincount(torch.tensor(kept.output_token_ids), minlength=VOCAB)
        assert stats.output_counts.tolist() == expected_counts.tolist()


def test_collect_token_stats_prompt_mask_and_counts() -> None:
    state = make_state(SamplingParams(frequency_penalty=1.0), prompt=[4, 4, 7], outputs=[1, 1, 2])
    counts, prompt_mask = collect_token_stats([state], VOCAB, CPU)
    assert prompt_mask[0].nonzero().flatten().tolist() == [4, 7]
    assert counts[0, :3].tolist() == [0, 2, 1]
    assert int(counts.sum()) == 3


def test_shrinking_outputs_and_out_of_vocab_tokens_are_errors() -> None:
    params = SamplingParams(presence_penalty=1.0)
    state = make_state(params, prompt=[0], outputs=[1, 2])
    sampler = Sampler(VOCAB, CPU)
    sampler.process_logits(torch.zeros(1, VOCAB), [state])
    state.output_token_ids.pop()
    with pytest.raises(RuntimeError, match="shrank from 2 to 1"):
        sampler.process_logits(torch.zeros(1, VOCAB), [state])
    # Prompt ids are validated at the edge (engine/input_processor.py); the step asserts them.
    with pytest.raises(AssertionError, match="prompt token ids outside"):
        sampler.process_logits(torch.zeros(1, VOCAB), [make_state(params, prompt=[3, 12], outputs=[])])


def test_stop_token_ids_are_banned_before_min_tokens() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[6, 50], ignore_eos=True)
    processed = Sampler(VOCAB, CPU).process_logits(torch.tensor([LOGITS_ROW]), [make_state(params, [0], [1])])
    assert processed[0, 6] == float("-inf")
    assert processed[0].isinf().sum() == 1  # EOS not banned (ignore_eos); 50 is past the vocabulary


penalty_values = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)
token_lists = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    repetition=st.floats(min_value=0.1, max_value=10.0),
    presence=penalty_values,
    frequency=penalty_values,
    prompt=token_lists,
    outputs=token_lists,
)
def test_penalties_match_reference_formulas(
    repetition: float, presence: float, frequency: float, prompt: list[int], outputs: list[int]
) -> None:
    params = SamplingParams(
        repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency
    )
    state = make_state(params, prompt, list(outputs))
    processed = Sampler(VOCAB, CPU).process_logits(torch.tensor([LOGITS_ROW]), [state])[0]
    expected = reference_penalties(LOGITS_ROW, params, prompt, outputs)
    assert processed.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
