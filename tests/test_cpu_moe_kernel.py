"""A MoE layer's quantized experts in one kernel call (kernels/cpu_moe.py, batchlm_moe_experts in
cpu_decode_experts.c: gather, every expert, routing weights and each token's sum) against the same
packed experts run one quantized matmul at a time, and against dense float experts; gpt-oss's experts
(gate/up biases, the clamped SwiGLU) on 8-bit and MXFP4 table panels, on every ISA path."""

from __future__ import annotations

import pytest
import torch

from batchlm.kernels import cpu_quant
from batchlm.kernels.cpu_moe import ExpertsKernel, experts_kernel_available
from batchlm.kernels.quant_panels import QuantizedWeight
from batchlm.layers.activation import CLAMPED_SWIGLU, get_gated_activation
from batchlm.layers.moe_quantized import DOWN, GATE, UP, QuantizedExperts, kernel_activation
from batchlm.layers.moe_routing import RoutingChoice, route_top_k
from batchlm.layers.quantization.base import QuantizedTensor
from cpu_isa import kernel_path

pytestmark = pytest.mark.skipif(not experts_kernel_available(), reason="no AVX2 CPU or C compiler here")
HIDDEN, INTER, EXPERTS = 256, 96, 6
SILU = get_gated_activation("silu")
# gpt-oss's alpha; a limit the random experts' gate/up outputs (spread about 1) pass often.
SWIGLU = get_gated_activation(CLAMPED_SWIGLU, alpha=1.702, limit=0.6)
# The ISA paths on this CPU: the best ("auto", AMX tiles where present), AVX-512 VNNI, AVX2.
PATHS = ["auto", "avx2", *(["avx512"] if cpu_quant.use_avx512() else [])]


def _experts(
    four_bit: bool, seed: int, act_fn: torch.nn.Module = SILU
) -> tuple[QuantizedExperts, list[torch.Tensor]]:
    """Random experts as Q8_0 of float weights (8-bit panels) or Q4_0 blocks (4-bit panels), with
    each expert's float [gate; up] and down for a reference."""
    generator = torch.Generator().manual_seed(seed)
    experts = QuantizedExperts(EXPERTS, HIDDEN, INTER, kernel_activation(act_fn))
    dense: list[torch.Tensor] = []
    for expert in range(EXPERTS):
        for part, shape in ((GATE, (INTER, HIDDEN)), (UP, (INTER, HIDDEN)), (DOWN, (HIDDEN, INTER))):
            weight = torch.randn(shape, generator=generator) * 0.05
            experts.put(expert, part, _q4_0(weight) if four_bit else weight)
            dense.append(weight)
    return experts, dense


def _mxfp4_experts(seed: int, act_fn: torch.nn.Module) -> QuantizedExperts:
    """Random experts as MXFP4 blocks (gpt-oss's released form), which pack as 4-bit table panels."""
    generator = torch.Generator().manual_seed(seed)
    experts = QuantizedExperts(EXPERTS, HIDDEN, INTER, kernel_activation(act_fn))
    for expert in range(EXPERTS):
        for part, (rows, cols) in ((GATE, (INTER, HIDDEN)), (UP, (INTER, HIDDEN)), (DOWN, (HIDDEN, INTER))):
            blocks = torch.randint(0, 256, (rows, cols // 32, 17), generator=generator, dtype=torch.uint8)
            # Exponent bytes 2^-7..2^-5: weights up to 6 * 2^-5, gate/up outputs about 1.
            blocks[:, :, 0] = torch.randint(
                121, 124, (rows, cols // 32), generator=generator, dtype=torch.uint8
            )
            experts.put(expert, part, QuantizedTensor("MXFP4", blocks.reshape(rows, -1), cols, 32, 17))
    return experts


def _q4_0(weight: torch.Tensor) -> QuantizedTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(weight.numpy(), GGMLQuantizationType.Q4_0)
    size, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    return QuantizedTensor("Q4_0", torch.from_numpy(blocks), weight.shape[1], size, nbytes)


def _choice(tokens: int, top_k: int, seed: int) -> RoutingChoice:
    logits = torch.randn(tokens, EXPERTS, generator=torch.Generator().manual_seed(seed))
    return route_top_k(logits, top_k, renormalize=True)


@pytest.mark.parametrize("four_bit", [False, True], ids=["8-bit", "4-bit"])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (3, 2), (40, 4), (130, 1)])
def test_one_call_equals_expert_by_expert(four_bit: bool, tokens: int, top_k: int) -> None:
    experts, _ = _experts(four_bit, seed=tokens)
    assert isinstance(experts.kernel, ExpertsKernel)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
    choice = _choice(tokens, top_k, seed=tokens + top_k)
    fused = experts.forward(x, choice, SILU)
    experts.kernel = None  # the same experts, one quantized matmul at a time
    reference = experts.forward(x, choice, SILU)
    assert fused.shape == reference.shape == (tokens, HIDDEN)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


@pytest.mark.skipif(not cpu_quant.use_amx(), reason="no AMX tiles on this CPU (or OS)")
@pytest.mark.parametrize("four_bit", [False, True], ids=["8-bit", "4-bit"])
def test_experts_on_amx_tiles_give_the_vnni_paths_bits(four_bit: bool) -> None:
    # 40 tokens to 4 of 6 experts: every expert has 8 rows or more, which take the tile unit.
    experts, _ = _experts(four_bit, seed=11)
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(4))
    choice = _choice(40, 4, seed=5)
    assert min(torch.bincount(choice.experts.flatten(), minlength=EXPERTS).tolist()) >= 8
    with kernel_path("auto"):
        assert cpu_quant.quant_isa() == cpu_quant.ISA_AMX
        tiles = experts.forward(x, choice, SILU)
    with kernel_path("avx512"):
        vnni = experts.forward(x, choice, SILU)
    assert torch.equal(tiles, vnni)


def test_one_call_follows_the_float_experts() -> None:
    # Q8_0 weights and 8-bit activations: within a percent of the float experts' output.
    experts, dense = _experts(four_bit=False, seed=7)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    choice = _choice(5, 2, seed=3)
    expected = torch.zeros(5, HIDDEN)
    for token in range(5):
        for weight, expert in zip(
            choice.weights[token].tolist(), choice.experts[token].tolist(), strict=True
        ):
            gate, up, down = dense[3 * expert : 3 * expert + 3]
            expected[token] += weight * (SILU(x[token : token + 1] @ torch.cat((gate, up)).t()) @ down.t())[0]
    fused = experts.forward(x, choice, SILU)
    assert (fused - expected).abs().max() <= 0.01 * expected.abs().max()


def _gpt_oss_experts(weights: str) -> QuantizedExperts:
    if weights == "table":
        experts = _mxfp4_experts(seed=21, act_fn=SWIGLU)
        packed = experts.gate_up[0].finish()
        assert isinstance(packed, QuantizedWeight) and packed.table  # the MXFP4 codes' table panels
        return experts
    return _experts(four_bit=False, seed=21, act_fn=SWIGLU)[0]


def _gate_up_bias(seed: int) -> torch.Tensor:
    return torch.randn(EXPERTS, 2 * INTER, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weights", ["8-bit", "table"])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 4), (3, 2), (40, 4)])
def test_gpt_oss_experts_in_one_call_equal_expert_by_expert(
    weights: str, path: str, tokens: int, top_k: int
) -> None:
    # gate/up biases and the clamped SwiGLU in the kernel; 40 tokens to 4 of 6 experts give every
    # expert 8 rows or more, which take AMX tiles on "auto" where the CPU has them.
    experts = _gpt_oss_experts(weights)
    assert isinstance(experts.kernel, ExpertsKernel)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(6))
    choice, bias = _choice(tokens, top_k, seed=tokens), _gate_up_bias(seed=tokens)
    if tokens == 40:
        assert min(torch.bincount(choice.experts.flatten(), minlength=EXPERTS).tolist()) >= 8
    with kernel_path(path):
        fused = experts.forward(x, choice, SWIGLU, bias)
        kernel, experts.kernel = experts.kernel, None
        reference = experts.forward(x, choice, SWIGLU, bias)
        # What the comparison tells apart: dropping the bias, or the clamp (a limit nothing reaches).
        unbiased = experts.forward(x, choice, SWIGLU)
        unclamped = experts.forward(
            x, choice, get_gated_activation(CLAMPED_SWIGLU, alpha=1.702, limit=1e9), bias
        )
        experts.kernel = kernel
    atol = 1e-5 * reference.abs().max().item()
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=atol)
    for wrong in (unbiased, unclamped):
        assert (wrong - reference).abs().max() > 100 * atol


def test_gpt_oss_experts_follow_the_float_experts() -> None:
    # Q8_0 weights and 8-bit activations: within a percent of float experts with their biases and clamp.
    experts, dense = _experts(four_bit=False, seed=8, act_fn=SWIGLU)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    choice, bias = _choice(5, 2, seed=3), _gate_up_bias(seed=4)
    expected = torch.zeros(5, HIDDEN)
    for token in range(5):
        for weight, expert in zip(
            choice.weights[token].tolist(), choice.experts[token].tolist(), strict=True
        ):
            gate, up, down = dense[3 * expert : 3 * expert + 3]
            gate_up = x[token : token + 1] @ torch.cat((gate, up)).t() + bias[expert]
            expected[token] += weight * (SWIGLU(gate_up) @ down.t())[0]
    fused = experts.forward(x, choice, SWIGLU, bias)
    assert (fused - expected).abs().max() <= 0.01 * expected.abs().max()


def test_experts_of_other_activations_go_expert_by_expert() -> None:
    # The kernel computes SiLU and the clamped SwiGLU; GELU experts keep the per-expert path.
    gelu = get_gated_activation("gelu_pytorch_tanh")
    assert kernel_activation(gelu) is None
    assert QuantizedExperts(EXPERTS, HIDDEN, INTER, kernel_activation(gelu)).kernel is None
