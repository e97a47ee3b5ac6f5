"""Truncation filters applied after temperature: top-k, top-p (nucleus) and min-p, batched per row."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int, top_p: torch.Tensor | None
) -> None:
    """Mask to -inf, in place, what top-k and then top-p drop. logits: [B, V].

    top_k [B] int64 (0 = off); max_top_k: its largest value, known on the host (0 = no row uses
    top-k). top_p [B] float (1 = off), or None when no row uses it; top-p acts on the distribution
    left after top-k. Tokens tied with the k-th value are kept.
    """
    if top_p is None:
        if max_top_k > 0:
            _apply_top_k_only(logits, top_k, max_top_k)
        return
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V] each
    if max_top_k > 0:
        # By value, as the top-k-only path: a row keeps the same tokens whichever path its batch takes.
        last = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size) - 1  # [B]
        kth = sorted_logits.gather(1, last.unsqueeze(1))  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, NEG_INF)
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    # Keep a token while the mass of the tokens ranked above it is below p: the smallest set
    # reaching p. Rows with p == 1 keep everything (cumsum rounding could exceed 1 otherwise).
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)  # [B, V]
    # The most likely token always stays: a top_p below float32's smallest number is 0 in `top_p`,
    # and its mass_before (0) would otherwise drop it too, leaving nothing to sample.
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, NEG_INF)
    logits.scatter_(1, order, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    # A partial top-k is cheaper than the full sort that top-p needs.
    values = logits.topk(min(max_top_k, logits.shape[1]), dim=-1).values  # [B, K], descending
    index = (top_k.clamp(min=1, max=values.shape[1]) - 1).unsqueeze(1)  # [B, 1]
    kth = values.gather(1, index)  # [B, 1]
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, NEG_INF)
    logits.masked_fill_(logits < kth, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose probability is below min_p times the top probability, in place.

    In logit space p_i < min_p * p_max is l_i < l_max + log(min_p), which needs no softmax;
    min_p = 0 gives a threshold of -inf and masks nothing. logits: [B, V]; min_p: [B].
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # [B, 1]
    logits.masked_fill_(logits < threshold, NEG_INF)
