"""gpt-oss's expert block against transformers' (GptOssMLP): the router's top-k-then-softmax, the
de-interleaved gate/up stacks, the clamped SwiGLU, the experts' biases, on the dense CPU path, the
int8 quantized experts, and split over two tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssMLP, GptOssTopKRouter

from batchlm.kernels.cpu_moe import ExpertActivation, experts_kernel_available
from batchlm.layers.activation import ClampedSwiGLU, get_gated_activation
from batchlm.layers.moe import SparseMoeBlock
from batchlm.layers.moe_routing import route_top_k
from batchlm.models.gpt_oss import GptOssForCausalLM, experts_in_our_layout
from batchlm.models.moe_config import read_gpt_oss
from models_harness import run_ranks, thread_groups

HIDDEN, INTER, EXPERTS, TOP_K = 64, 64, 4, 2


def _config(limit: float = 0.5) -> GptOssConfig:
    return GptOssConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=2,
        swiglu_limit=limit,
    )


def _hf_block(config: GptOssConfig) -> GptOssMLP:
    torch.manual_seed(0)
    block = GptOssMLP(config)
    with torch.no_grad():
        for param in block.parameters():  # biases too, which transformers starts at zero
            param.normal_(0.0, 0.2)
    return block.eval()


def _ours_from(hf: GptOssMLP, config: GptOssConfig, **kwargs: object) -> SparseMoeBlock:
    ours = SparseMoeBlock(read_gpt_oss(config).spec(HIDDEN), **kwargs)  # type: ignore[arg-type]
    checkpoint = [(f"model.layers.0.mlp.{name}", tensor.detach()) for name, tensor in hf.state_dict().items()]
    renamed = [(name.replace(".mlp.router.", ".mlp.gate."), tensor) for name, tensor in checkpoint]
    for name, tensor in experts_in_our_layout(renamed):
        module, _, param = name.removeprefix("model.layers.0.mlp.").rpartition(".")
        if module == "experts":
            ours.experts.load_weight(name, param, tensor)
        else:
            with torch.no_grad():
                getattr(ours.gate, param).copy_(tensor)
    return ours


def _x(tokens: int = 23) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))


def test_clamped_swiglu_on_gate_then_up_is_transformers_on_interleaved() -> None:
    config = _config(limit=1.0)
    experts = GptOssExperts(config)
    interleaved = 3 * torch.randn(9, 2 * INTER, generator=torch.Generator().manual_seed(2))
    gate_then_up = torch.cat([interleaved[:, ::2], interleaved[:, 1::2]], dim=1)
    ours = get_gated_activation("swiglu_clamped", alpha=config.swiglu_alpha, limit=config.swiglu_limit)
    assert isinstance(ours, ClampedSwiGLU)
    assert torch.equal(ours(gate_then_up), experts._apply_gate(interleaved))
    assert (interleaved.abs() > 1.0).any()  # the clamps bite


def test_routing_is_transformers_top_k_then_softmax() -> None:
    config = _config()
    router = GptOssTopKRouter(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.bias.normal_(0.0, 0.5)
    x = _x(50)
    _, their_weights, their_experts = router(x)
    ours = route_top_k(torch.nn.functional.linear(x, router.weight, router.bias), TOP_K, renormalize=True)
    assert torch.equal(ours.experts, their_experts)
    torch.testing.assert_close(ours.weights, their_weights, atol=1e-6, rtol=0)


def test_block_matches_transformers() -> None:
    config = _config()
    hf = _hf_block(config)
    ours = _ours_from(hf, config)
    x = _x()
    with torch.no_grad():
        expected = hf(x[None])[0][0]
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        # Each bias counts: without it the block gives other outputs.
        for bias in (ours.experts.gate_up_proj_bias, ours.experts.down_proj_bias, ours.gate.bias):
            assert bias is not None
            kept = bias.clone()
            bias.zero_()
            assert not torch.allclose(ours(x), expected, atol=1e-3)
            bias.copy_(kept)


def test_gate_and_up_rows_are_deinterleaved_at_load() -> None:
    config = _config()
    hf = _hf_block(config)
    ours = _ours_from(hf, config).experts
    stacked = hf.experts.gate_up_proj.detach()  # [E, H, 2I], gate at even columns
    assert torch.equal(ours.gate_up_proj[:, :INTER], stacked[..., ::2].transpose(1, 2))
    assert torch.equal(ours.gate_up_proj[:, INTER:], stacked[..., 1::2].transpose(1, 2))
    assert torch.equal(ours.down_proj, hf.experts.down_proj.detach().transpose(1, 2))
    assert ours.gate_up_proj_bias is not None
    bias = hf.experts.gate_up_proj_bias.detach()
    assert torch.equal(ours.gate_up_proj_bias, torch.cat([bias[:, ::2], bias[:, 1::2]], dim=1))


def test_two_ranks_sum_to_the_whole_block() -> None:
    """Each rank holds its gate/up rows and bias share; the down bias joins once, after the all-reduce."""
    config = _config()
    hf = _hf_block(config)
    whole = _ours_from(hf, config)
    groups = thread_groups(2)
    ranks = [_ours_from(hf, config, tp=group) for group in groups]
    assert ranks[1].experts.gate_up_proj_bias is not None
    assert ranks[1].experts.gate_up_proj_bias.shape == (EXPERTS, INTER)
    x = _x()
    with torch.no_grad():
        expected = whole(x)
        outputs = run_ranks(lambda rank: ranks[rank](x), 2)
    for out in outputs:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not experts_kernel_available(), reason="no AVX2 CPU or C compiler here")
@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "expert-by-expert"])
def test_int8_experts_add_their_biases(fused: bool) -> None:
    """On the fused experts kernel (biases and the clamped SwiGLU in C) and expert by expert alike."""
    config = _config()
    hf = _hf_block(config)
    dense = _ours_from(hf, config)
    quantized = SparseMoeBlock(read_gpt_oss(config).spec(HIDDEN))
    quantized.experts.quantize_experts()
    experts = quantized.experts.quantized
    assert experts is not None and experts.kernel is not None
    assert experts.kernel.activation == ExpertActivation.clamped_swiglu(1.702, 0.5)
    if not fused:
        experts.kernel = None
    state = {f"model.layers.0.mlp.{name}": t.detach() for name, t in hf.state_dict().items()}
    for name, tensor in experts_in_our_layout(state.items()):
        module, _, param = name.removeprefix("model.layers.0.mlp.").rpartition(".")
        if module == "experts":
            quantized.experts.load_weight(name, param, tensor)
    with torch.no_grad():
        quantized.gate.load_state_dict(dense.gate.state_dict())
        x = _x()
        expected = dense(x)
        # Q8_0 weights and int8 activations: within 2% of the largest output.
        tolerance = 0.02 * expected.abs().max().item()
        torch.testing.assert_close(quantized(x), expected, atol=tolerance, rtol=0)


def test_router_is_renamed_and_experts_are_not_silu() -> None:
    assert dict(GptOssForCausalLM.checkpoint_renames) == {".mlp.router.": ".mlp.gate."}
    moe = read_gpt_oss(_config(limit=7.0))
    assert moe.renormalize and moe.router_bias and moe.expert_bias and all(moe.sparse_layers)
    assert dict(moe.act_options) == {"alpha": 1.702, "limit": 7.0}
