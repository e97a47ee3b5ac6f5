"""Top-k expert routing, and the sort of (token, expert) pairs into expert-aligned blocks that the
grouped GEMM walks. Plain torch ops with shapes fixed by the token count, so a decode step that runs
them can be captured in a CUDA graph (no host sync, no data-dependent sizes). The CPU paths take the
unpadded sort (`sort_by_expert`), whose per-expert counts come to the host."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingChoice:
    """Each token's chosen experts and the weights of their outputs."""

    # [T, top_k] float32: the weight of each chosen expert's output.
    weights: torch.Tensor
    # [T, top_k] int64: the chosen experts, best first.
    experts: torch.Tensor


def route_top_k(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> RoutingChoice:
    """Softmax over all experts in float32, keep the top_k, and (renormalize) rescale them to sum to 1.

    This is transformers' order for both families: Qwen3-MoE renormalizes when `norm_topk_prob`;
    Mixtral always does, which equals a softmax over the top-k logits.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RoutingChoice(weights, experts)


@dataclass(frozen=True)
class ExpertRuns:
    """The T * top_k (token, expert) slots sorted by expert (stably), unpadded: the host's form, for
    one matmul pair (or one kernel call) per expert that has tokens."""

    # [T * top_k] int64 / float32: each sorted slot's token and routing weight.
    tokens: torch.Tensor
    weights: torch.Tensor
    # Slots of each expert, in expert order (runs of the sorted slots).
    counts: list[int]


def sort_by_expert(choice: RoutingChoice, num_experts: int) -> ExpertRuns:
    top_k = choice.experts.shape[1]
    flat = choice.experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return ExpertRuns(order // top_k, choice.weights.reshape(-1)[order], counts)


@dataclass(frozen=True)
class ExpertBlocks:
    """The T * top_k (token, expert) slots sorted by expert, each expert's run padded to whole
    blocks of `block_m` rows; slot s is token s // top_k's choice number s % top_k."""

    # [P] int64: the slot in each row of the padded order; `num_slots` marks a padding row.
    sorted_slots: torch.Tensor
    # [P // block_m] int64: the expert of each block; num_experts for blocks past the last run.
    block_experts: torch.Tensor
    # [1] int64: rows in use (the sum of the padded runs); later blocks are skipped.
    padded_rows: torch.Tensor
    num_slots: int
    block_m: int


def padded_row_bound(num_slots: int, num_experts: int, block_m: int) -> int:
    """Most rows the padded order can need: every used expert wastes under one block."""
    used = min(num_experts, num_slots)
    rows = num_slots + used * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_to_blocks(experts: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Sort the slots of `experts` ([T, top_k]) by expert and pad each expert's run to block_m rows.

    A slot's place in its expert's run is the count of earlier slots choosing the same expert, read
    from a running count over a one-hot [slots, E] matrix. That keeps the slots' order within each run
    (transformers' summation order) without a device sort, which CUDA graph capture does not always
    accept (CUB's stable sort fails to capture at some sizes).
    """
    flat = experts.reshape(-1)
    num_slots = flat.numel()
    device = flat.device
    one_hot = torch.zeros((num_slots, num_experts), dtype=torch.int32, device=device)
    one_hot.scatter_(1, flat[:, None], 1)
    rank_in_run = one_hot.cumsum(0, dtype=torch.int32).gather(1, flat[:, None]).squeeze(1) - 1
    counts = one_hot.sum(0)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    destination = padded_ends[flat] - padded[flat] + rank_in_run
    bound = padded_row_bound(num_slots, num_experts, block_m)
    sorted_slots = torch.full((bound,), num_slots, dtype=torch.int64, device=device)
    sorted_slots.scatter_(0, destination, torch.arange(num_slots, device=device))
    block_starts = torch.arange(0, bound, block_m, device=device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True)
    return ExpertBlocks(sorted_slots, block_experts, padded_ends[-1:], num_slots, block_m)
