"""A MoE layer's experts in one kernel call (kernels/cpu_moe.py, batchlm_moe_experts in
cpu_decode_stack.c) against the same packed experts run one quantized matmul at a time."""

from __future__ import annotations

import pytest
import torch

from batchlm.kernels.cpu_moe import ExpertsKernel, experts_kernel_available
from batchlm.layers.activation import get_gated_activation
from batchlm.layers.moe_quantized import DOWN, GATE, UP, QuantizedExperts
from batchlm.layers.quantization.base import QuantizedTensor

pytestmark = pytest.mark.skipif(not experts_kernel_available(), reason="no AVX2 CPU or C compiler here")
HIDDEN, INTER, EXPERTS = 256, 96, 6


def _experts(dense: bool, seed: int) -> QuantizedExperts:
    """Random experts: float weights (Q8_0 of them, 8-bit panels) or Q4_0 blocks (4-bit panels)."""
    generator = torch.Generator().manual_seed(seed)
    experts = QuantizedExperts(EXPERTS, HIDDEN, INTER, silu=True)
    for expert in range(EXPERTS):
        for part, shape in ((GATE, (INTER, HIDDEN)), (UP, (INTER, HIDDEN)), (DOWN, (HIDDEN, INTER))):
            weight = torch.randn(shape, generator=generator) * 0.05
            if not dense:
                weight = _q4_0(weight)
            experts.put(expert, part, weight)
    return experts


def _q4_0(weight: torch.Tensor) -> QuantizedTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(weight.numpy(), GGMLQuantizationType.Q4_0)
    size, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    return QuantizedTensor("Q4_0", torch.from_numpy(blocks), weight.shape[1], size, nbytes)


@pytest.mark.parametrize("dense", [True, False], ids=["8-bit", "4-bit"])
@pytest.mark.parametrize("counts", [[1, 0, 0, 1, 0, 0], [0, 3, 1, 0, 5, 2], [40, 0, 17, 1, 0, 64]])
def test_one_call_equals_expert_by_expert(dense: bool, counts: list[int]) -> None:
    experts = _experts(dense, seed=sum(counts))
    assert isinstance(experts.kernel, ExpertsKernel)
    rows = torch.randn(sum(counts), HIDDEN, generator=torch.Generator().manual_seed(1))
    fused = experts.run(rows, counts, get_gated_activation("silu"))
    experts.kernel = None  # the same experts, one quantized matmul at a time
    reference = experts.run(rows, counts, get_gated_activation("silu"))
    assert fused.shape == reference.shape == (sum(counts), HIDDEN)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())
