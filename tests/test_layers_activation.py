"""Gated activations (SiLU, GeLU-tanh) on a fused [gate | up] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchlm.layers.activation import SiluAndMul, get_gated_activation


def test_silu_of_gate_times_up() -> None:
    gate, up = torch.randn(3, 5), torch.randn(3, 5)
    torch.testing.assert_close(SiluAndMul()(torch.cat([gate, up], dim=-1)), F.silu(gate) * up)


def test_unknown_activation_is_named() -> None:
    assert isinstance(get_gated_activation("silu"), SiluAndMul)
    with pytest.raises(ValueError, match="unsupported hidden_act 'relu2'"):
        get_gated_activation("relu2")


def test_gelu_tanh_gating_matches_transformers() -> None:
    from transformers.activations import ACT2FN

    x = torch.randn(5, 2 * 24)
    expected = ACT2FN["gelu_pytorch_tanh"](x[:, :24]) * x[:, 24:]
    torch.testing.assert_close(get_gated_activation("gelu_pytorch_tanh")(x), expected, rtol=0, atol=0)
