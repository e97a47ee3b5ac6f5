"""Tests for batchlm.sampling.filters: the exact masks of top-k, top-p and min-p."""

from __future__ import annotations

import math

import torch

from batchlm.sampling.filters import apply_min_p, apply_top_k_top_p

INF = float("inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [row.isfinite().nonzero().flatten().tolist() for row in logits]


def test_top_k_only_path_keeps_k_largest_per_row() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0], [4.0, 3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    apply_top_k_top_p(logits, torch.tensor([2, 0, 1]), max_top_k=2, top_p=None)
    assert kept(logits) == [[1, 4], [0, 1, 2, 3, 4], [4]]
    assert logits[0, 1] == 3.0  # survivors keep their values


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    apply_top_k_top_p(logits, torch.tensor([2]), max_top_k=2, top_p=None)
    assert kept(logits) == [[0, 1, 2]]


def test_both_paths_keep_the_ties_of_the_kth_value() -> None:
    # A top-k row beside a top-p row takes the sort path: it must keep what it keeps alone, or a seeded
    # request's tokens would depend on its batch-mates.
    row = [2.0, 1.0, 1.0, 0.0, 1.0]
    alone = torch.tensor([row])
    apply_top_k_top_p(alone, torch.tensor([2]), max_top_k=2, top_p=None)
    beside = torch.tensor([row, row])
    apply_top_k_top_p(beside, torch.tensor([2, 0]), max_top_k=2, top_p=torch.tensor([1.0, 0.5]))
    assert kept(alone) == kept(beside[:1]) == [[0, 1, 2, 4]]
    # top-p then acts on what top-k kept, the ties included: mass 0.48 + 0.17 of the 4 reaches 0.6.
    both = torch.tensor([row])
    apply_top_k_top_p(both, torch.tensor([2]), max_top_k=2, top_p=torch.tensor([0.6]))
    assert len(kept(both)[0]) == 2 and kept(both)[0][0] == 0


def test_sort_path_applies_top_k_then_top_p() -> None:
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    logits = torch.tensor([[math.log(p) for p in probs]] * 3)
    top_k = torch.tensor([0, 3, 0])
    top_p = torch.tensor([0.65, 0.9, 1.0])
    apply_top_k_top_p(logits, top_k, max_top_k=3, top_p=top_p)
    # Row 0: 0.4 + 0.3 reaches 0.65. Row 1: top-3 renormalised is [0.47, 0.35, 0.18]; 0.9 needs all 3.
    assert kept(logits) == [[1, 3], [1, 3, 4], [0, 1, 2, 3, 4]]


def test_top_p_always_keeps_the_top_token() -> None:
    logits = torch.tensor([[0.0, 10.0, 1.0]])
    apply_top_k_top_p(logits, torch.tensor([0]), max_top_k=0, top_p=torch.tensor([0.01]))
    assert kept(logits) == [[1]]


def test_min_p_threshold_is_relative_to_max_probability() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([[math.log(p) for p in probs]] * 3)
    apply_min_p(logits, torch.tensor([0.2, 0.0, 1.0]))
    assert kept(logits) == [[0, 1, 2], [0, 1, 2, 3], [0]]


def test_top_p_one_keeps_tokens_whose_mass_rounds_away() -> None:
    # softmax(20, 0, 0) rounds the top probability to exactly 1.0 in float32; top_p=1 must still
    # keep the rest (the row shares the sort path with a row that does use top-p).
    logits = torch.tensor([[20.0, 0.0, 0.0], [20.0, 0.0, 0.0]])
    apply_top_k_top_p(logits, torch.tensor([0, 0]), max_top_k=0, top_p=torch.tensor([1.0, 0.5]))
    assert kept(logits) == [[0, 1, 2], [0]]


def test_top_p_below_float32_range_keeps_the_top_token() -> None:
    # 1e-50 is a valid top_p (greater than 0) but 0 in a float32 tensor: the row keeps its top token
    # (as a tiny top_p does), not nothing (which sampled token 0 whatever the logits).
    logits = torch.tensor([[0.0, 10.0, 1.0], [3.0, 0.0, 1.0]])
    apply_top_k_top_p(logits, torch.tensor([0, 2]), max_top_k=2, top_p=torch.tensor([1e-50, 5e-324]))
    assert kept(logits) == [[1], [0]]
