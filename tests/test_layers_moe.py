"""The fused MoE layer against transformers' sparse blocks: routing, the per-expert CPU path, loading
(per-expert and stacked tensors), the tensor-parallel split, and the block alignment the grouped GEMM
walks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec, SparseMoeBlock
from batchlm.layers.moe_routing import align_to_blocks, padded_row_bound, route_top_k
from batchlm.parallel.group import TensorParallelGroup
from interpreter_harness import run_interpreted

SIZES = {"hidden_size": 32, "moe_intermediate_size": 24, "intermediate_size": 24, "num_experts_per_tok": 3}


def _hf_block(model_type: str, norm_topk: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, num_experts=8, num_local_experts=8, norm_topk_prob=norm_topk, **SIZES
    )
    block = Qwen3MoeSparseMoeBlock(config) if model_type == "qwen3_moe" else MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block.eval()


def _spec(model_type: str, renormalize: bool) -> MoESpec:
    inter = SIZES["moe_intermediate_size"] if model_type == "qwen3_moe" else SIZES["intermediate_size"]
    return MoESpec(8, SIZES["num_experts_per_tok"], SIZES["hidden_size"], inter, renormalize)


def _ours_from(hf: torch.nn.Module, spec: MoESpec, tp: TensorParallelGroup | None = None) -> SparseMoeBlock:
    ours = SparseMoeBlock(spec, tp) if tp is not None else SparseMoeBlock(spec)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
    ours.experts.load_weight("gate_up_proj", "gate_up_proj", hf.experts.gate_up_proj.detach())
    ours.experts.load_weight("down_proj", "down_proj", hf.experts.down_proj.detach())
    return ours


@pytest.mark.parametrize(
    ("model_type", "renormalize"), [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)]
)
def test_block_matches_transformers(model_type: str, renormalize: bool) -> None:
    hf = _hf_block(model_type, renormalize)
    ours = _ours_from(hf, _spec(model_type, renormalize))
    x = torch.randn(2, 7, SIZES["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).reshape(14, -1)
        got = ours(x.reshape(14, -1))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_routing_matches_transformers_routers() -> None:
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(2))
    for model_type, renormalize in (("qwen3_moe", False), ("qwen3_moe", True), ("mixtral", True)):
        hf = _hf_block(model_type, renormalize)
        hidden = torch.randn(9, SIZES["hidden_size"], generator=torch.Generator().manual_seed(3))
        _, hf_weights, hf_experts = hf.gate(hidden)
        choice = route_top_k(torch.nn.functional.linear(hidden, hf.gate.weight), 3, renormalize)
        assert torch.equal(choice.experts, hf_experts)
        torch.testing.assert_close(choice.weights, hf_weights.float(), atol=1e-7, rtol=1e-6)
    # Mixtral's rule, a softmax over the kept logits, is the renormalized softmax.
    choice = route_top_k(logits, 2, renormalize=True)
    kept = torch.topk(logits, 2, dim=-1)
    torch.testing.assert_close(choice.weights, torch.softmax(kept.values, dim=-1))
    assert torch.equal(choice.experts, kept.indices)


def test_per_expert_tensors_load_like_stacked_ones() -> None:
    hf = _hf_block("qwen3_moe")
    spec = _spec("qwen3_moe", True)
    stacked = _ours_from(hf, spec).experts
    per_expert = FusedMoE(spec)
    inter = spec.intermediate_size
    for e in range(spec.num_experts):
        per_expert.load_expert(f"{e}.gate_proj", e, GATE, hf.experts.gate_up_proj[e, :inter].detach())
        per_expert.load_expert(f"{e}.up_proj", e, UP, hf.experts.gate_up_proj[e, inter:].detach())
        assert (e, DOWN) in per_expert.missing_parts()
        per_expert.load_expert(f"{e}.down_proj", e, DOWN, hf.experts.down_proj[e].detach())
    assert per_expert.missing_parts() == []
    assert torch.equal(per_expert.gate_up_proj, stacked.gate_up_proj)
    assert torch.equal(per_expert.down_proj, stacked.down_proj)
    with pytest.raises(ValueError, match="shape mismatch"):
        per_expert.load_expert("bad", 0, DOWN, torch.zeros(inter, spec.hidden_size))


@dataclass(frozen=True)
class _SumLater(TensorParallelGroup):
    """A rank whose all-reduce is left to the test (it adds the ranks' outputs itself)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_tensor_parallel_shares_sum_to_the_whole() -> None:
    hf = _hf_block("mixtral")
    spec = _spec("mixtral", True)
    whole = _ours_from(hf, spec)
    ranks = [_ours_from(hf, spec, _SumLater(rank, 2)) for rank in range(2)]
    assert ranks[0].experts.down_proj.shape == (8, spec.hidden_size, spec.intermediate_size // 2)
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ranks[0](x) + ranks[1](x), whole(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("tokens", "top_k", "block_m"), [(1, 2, 16), (7, 3, 16), (40, 2, 4), (0, 2, 16)])
def test_blocks_hold_one_expert_and_every_slot_once(tokens: int, top_k: int, block_m: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    experts = (
        torch.stack([torch.randperm(8, generator=generator)[:top_k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, top_k, dtype=torch.long)
    )
    blocks = align_to_blocks(experts, 8, block_m)
    slots = blocks.sorted_slots
    assert slots.numel() == padded_row_bound(tokens * top_k, 8, block_m)
    used = int(blocks.padded_rows.item())
    assert used % block_m == 0 and (slots[used:] == tokens * top_k).all()
    real = slots[slots < tokens * top_k]
    assert sorted(real.tolist()) == list(range(tokens * top_k))
    flat = experts.reshape(-1)
    for block, expert in enumerate(blocks.block_experts.tolist()):
        rows = slots[block * block_m : (block + 1) * block_m]
        rows = rows[rows < tokens * top_k]
        if block * block_m >= used:
            assert expert == 8
        else:
            assert rows.numel() > 0 and (flat[rows] == expert).all()
    # Within an expert, slots keep their order (so the output sum runs in transformers' order).
    assert torch.equal(flat[real], torch.sort(flat[real], stable=True).values)


INTERPRET_CHECK = """
import torch
from batchlm.kernels.moe_gemm import grouped_gemm
from batchlm.layers.moe import FusedMoE, MoESpec
from batchlm.layers.moe_routing import align_to_blocks, route_top_k
torch.manual_seed(0)
spec = MoESpec(num_experts=6, top_k=2, hidden_size=48, intermediate_size=40, renormalize=True)
layer = FusedMoE(spec)
torch.nn.init.normal_(layer.gate_up_proj, std=0.2)
torch.nn.init.normal_(layer.down_proj, std=0.2)
x = torch.randn(11, 48)
choice = route_top_k(torch.randn(11, 6), 2, True)
expected = layer._forward_per_expert(x, choice)
# float16 stands for the half types: the interpreter computes bfloat16 wrongly (numpy has none).
for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
    for block_m in (16, 32):
        blocks = align_to_blocks(choice.experts, 6, block_m)
        gate_up = grouped_gemm(x.to(dtype), layer.gate_up_proj.to(dtype), blocks, 2)
        activated = layer.act_fn(gate_up.float()).to(dtype)
        down = grouped_gemm(activated, layer.down_proj.to(dtype), blocks, 1, choice.weights.reshape(-1))
        got = down.view(11, 2, -1).float().sum(dim=1)
        torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
print("grouped gemm ok")
"""


def test_grouped_gemm_under_the_triton_interpreter() -> None:
    run_interpreted(INTERPRET_CHECK, "grouped gemm ok", timeout=300)
