"""Verification of draft tokens in the runner: accepted prefixes, the output's shape, and a statistical
check that sampling every position and accepting a draft when it equals the sample is rejection
sampling for a point-mass draft (accepted with probability p(d); a rejection yields p without d,
renormalized; the token after an accepted draft follows p)."""

from __future__ import annotations

import torch

from batchlm.core.step_io import ScheduledChunk, SchedulerOutput
from batchlm.core.token_runs import common_prefix_length
from batchlm.runner.draft_verify import Verification, row_states, verify_groups
from batchlm.sampling.sampler import Sampler
from batchlm.sampling.state import SamplingState
from batchlm.sampling_params import SamplingParams


def _state(params: SamplingParams, seed: int | None = None) -> SamplingState:
    return SamplingState.create(params, seed, [1, 2], [3], (), "cpu")


def test_accepted_drafts_are_the_matching_prefix() -> None:
    assert common_prefix_length([4, 5, 6], [4, 5]) == 2
    assert common_prefix_length([4, 9, 6], [4, 5]) == 1
    assert common_prefix_length([9, 5, 6], [4, 5]) == 0


def test_groups_rows_and_output() -> None:
    chunks = (
        ScheduledChunk("plain", (7,), 5, (0,), True),
        ScheduledChunk("prefill", (1, 2, 3), 0, (1,), False),
        ScheduledChunk("verify", (8, 20, 21, 22), 9, (2,), True, 3),
        ScheduledChunk("late", (9, 30), 4, (3,), True, 1),
    )
    groups = verify_groups(SchedulerOutput(chunks, (), frozenset()))
    assert [(g.request_id, g.first_row, g.draft_token_ids) for g in groups] == [
        ("verify", 1, (20, 21, 22)),
        ("late", 5, (30,)),
    ]
    params = SamplingParams(temperature=0.0)
    states = {name: _state(params) for name in ("plain", "verify", "late")}
    row_ids = ["plain", "verify", "verify", "verify", "verify", "late", "late"]
    rows = row_states(states, row_ids, groups)
    # Row i of a group stands after i drafts: its output holds them, and the request's own state is
    # left alone.
    assert [r.num_generated for r in rows] == [1, 1, 2, 3, 4, 1, 2]
    assert rows[3].output_token_ids == [3, 20, 21]
    assert states["verify"].output_token_ids == [3]
    # The runner's resolve step has written each row's first token into the request's own state.
    states["verify"].output_token_ids.append(20)
    states["late"].output_token_ids.append(31)
    verification = Verification(tuple(groups), {g.request_id: states[g.request_id] for g in groups})
    output = verification.output(row_ids, [50, 20, 21, 40, 41, 31, 60], [None] * 7)
    assert output.request_ids == ("plain", "verify", "late")
    assert output.sampled_token_ids == (50, 40, 31)
    assert output.accepted_drafts["verify"].token_ids == (20, 21)
    assert output.accepted_drafts["late"].token_ids == ()
    assert states["verify"].output_token_ids == [3, 20, 21, 40]
    assert states["late"].output_token_ids == [3, 31]


def test_acceptance_follows_the_target_distribution() -> None:
    """2 rows per trial (the draft's position, the one after), 40000 trials on one fixed generator."""
    logits_row = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0])
    temperature = 0.8
    target = torch.softmax(logits_row / temperature, dim=0)
    draft = 3
    trials = 40_000
    sampler = Sampler(vocab_size=5, device="cpu", seed=1234)
    params = SamplingParams(temperature=temperature)
    state = _state(params)
    chunks = tuple(ScheduledChunk(f"r{i}", (0, draft), 10, (0,), True, 1) for i in range(trials))
    groups = verify_groups(SchedulerOutput(chunks, (), frozenset()))
    states = {f"r{i}": state for i in range(trials)}
    row_ids = [f"r{i}" for i in range(trials) for _ in range(2)]
    rows = row_states(states, row_ids, groups)
    logits = logits_row.expand(2 * trials, 5).contiguous()
    sampled = sampler(logits, rows).token_ids_cpu
    verification_states = {f"r{i}": _state(params) for i in range(trials)}
    verification = Verification(tuple(groups), verification_states)
    output = verification.output(row_ids, sampled, [None] * len(sampled))
    accepted = [len(output.accepted_drafts[f"r{i}"].token_ids) for i in range(trials)]
    rate = sum(accepted) / trials
    p_draft = float(target[draft])
    # 5 standard deviations of a binomial proportion.
    assert abs(rate - p_draft) < 5 * (p_draft * (1 - p_draft) / trials) ** 0.5
    rejected = [t for t, a in zip(output.sampled_token_ids, accepted, strict=True) if not a]
    after_accept = [t for t, a in zip(output.sampled_token_ids, accepted, strict=True) if a]
    residual = target.clone()
    residual[draft] = 0
    residual /= residual.sum()
    for tokens, expected in ((rejected, residual), (after_accept, target)):
        counts = torch.bincount(torch.tensor(tokens), minlength=5).double() / len(tokens)
        bound = 5 * (expected * (1 - expected) / len(tokens)).sqrt() + 1e-9
        assert torch.all((counts - expected).abs() <= bound), (counts, expected)
    assert draft not in rejected
