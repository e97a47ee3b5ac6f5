"""RMSNorm and its fused add-residual form, against the HF Llama implementation."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from batchlm.layers.norm import RMSNorm


def _pair(hidden: int = 16, eps: float = 1e-5) -> tuple[RMSNorm, LlamaRMSNorm]:
    ours, theirs = RMSNorm(hidden, eps), LlamaRMSNorm(hidden, eps)
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    return ours, theirs


def test_matches_transformers_in_float32_and_bfloat16() -> None:
    ours, theirs = _pair()
    x = torch.randn(5, 16) * 3
    torch.testing.assert_close(ours(x), theirs(x))
    ours_bf16, theirs_bf16 = ours.bfloat16(), theirs.bfloat16()
    torch.testing.assert_close(ours_bf16(x.bfloat16()), theirs_bf16(x.bfloat16()), rtol=0, atol=0)


def test_fused_residual_returns_norm_of_sum_and_the_sum() -> None:
    ours, theirs = _pair()
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, theirs(x + residual))


def test_normalises_each_row_independently() -> None:
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, -2.0, 2.0, -2.0]])
    torch.testing.assert_close(norm(x), torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]))


def test_float32_fast_path_is_bit_identical_to_transformers() -> None:
    # The float32 path is a different kernel (F.rms_norm); greedy equality with transformers needs
    # the very same bits, across widths that exercise vectorised and tail reductions.
    for hidden in (16, 67, 576):
        ours, theirs = _pair(hidden)
        x = torch.randn(9, hidden) * 5
        assert torch.equal(ours(x), theirs(x))
        residual = torch.randn(9, hidden)
        normed, summed = ours(x, residual)
        assert torch.equal(normed, theirs(x + residual)) and torch.equal(summed, x + residual)
