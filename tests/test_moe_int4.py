"""Experts kept as 4-bit stacks (a GPU's form of a GPTQ, AWQ or compressed-tensors checkpoint's experts,
or of dense ones under --quantization w4a16), on the CPU: the stacks hold a checkpoint's very codes,
scales and zero points and widen to the values its dequantization gives, so a layer holding them
computes what the same experts dense compute; groups wider than 128 inputs are held as groups of 128;
dense experts are quantized per 128 inputs; the grouped GEMM widens them exactly (Triton's
interpreter); the loader chooses them for 4-bit experts and under --quantization w4a16, on a GPU.
The choice on a GPU is stood in for here (the stacks run on any device); tests/gpu/test_moe_fp8_int4_gpu.py
runs them there."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batchlm.kernels.int4_stack import Int4Stack
from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec
from batchlm.layers.moe_int4 import int4_groups
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.forms import Int4Weight
from batchlm.layers.quantization.int4 import quantize_int4_groups
from batchlm.layers.quantization.registry import BLOCK_FP8_QTYPE, INT4_QTYPE
from batchlm.models import weight_methods
from batchlm.models.random_model import write_random_model
from expert_stacks_harness import (
    WIDENS_EXACTLY,
    assert_checkpoint_serves_as_dense,
    assert_ranks_sum_to_one_rank,
    built_moe_model,
    experts_chosen,
    pair_layers,
    random_moe_experts,
    rank_layers,
    widening_script,
)
from interpreter_harness import run_interpreted
from models_harness import CPU
from quant_checkpoints import (
    awq_tensors,
    compressed_config,
    compressed_int4_tensors,
    gptq_tensors,
    random_int4,
    rewrite_checkpoint,
)

SPEC = MoESpec(num_experts=6, top_k=2, hidden_size=128, intermediate_size=256, renormalize=True)
# Sizes of whole 128-input groups, as 4-bit experts need; contexts as long as the GPU test's arrivals.
WHOLE = {
    "hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256, "head_dim": 32,
    "max_position_embeddings": 2048,
}  # fmt: skip


def _int4(rows: int, cols: int, seed: int, group: int = 32) -> Int4Weight:
    return random_int4(rows, cols, group, symmetric=False, seed=seed)


def _loaded_pair(spec: MoESpec = SPEC, group: int = 32) -> tuple[FusedMoE, FusedMoE]:
    """The same 4-bit experts loaded dense (dequantized) and as 4-bit stacks."""
    return pair_layers(
        spec, torch.float32, "int4", lambda rows, cols, seed: _int4(rows, cols, seed, group), CPU
    )


def test_stacks_hold_the_checkpoint_codes_scales_and_zero_points() -> None:
    _, kept = _loaded_pair()
    assert kept.int4 is not None and kept.kept is kept.int4 and kept.int4.group_size == 32
    up = _int4(256, 128, seed=10 * 4 + UP)
    stack = kept.int4.gate_up
    assert torch.equal(stack.codes[4, 256:] & 15, up.codes[:, 0::2])
    assert torch.equal(stack.codes[4, 256:] >> 4, up.codes[:, 1::2])
    assert torch.equal(stack.scales[4, 256:], up.scales.float())
    assert torch.equal(stack.zeros[4, 256:], up.zeros)
    experts, hidden, inter = SPEC.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    # Half a byte a weight, and five bytes (a float32 scale, a zero point) a group of 32.
    assert kept.int4.nbytes() == experts * 3 * hidden * inter * (1 / 2 + 5 / 32)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_a_layer_of_int4_stacks_computes_as_its_experts_dense(group: int) -> None:
    dense, kept = _loaded_pair(group=group)
    assert kept.int4 is not None and kept.int4.group_size == group
    gate_up, down = kept.int4.expert_weights(3, torch.float32)
    assert torch.equal(gate_up, dense.gate_up_proj[3]) and torch.equal(down, dense.down_proj[3])
    x = torch.randn(9, SPEC.hidden_size, generator=torch.Generator().manual_seed(6))
    choice = route_top_k(torch.randn(9, 6, generator=torch.Generator().manual_seed(7)), 2, True)
    with torch.no_grad():
        assert torch.equal(kept(x, choice), dense(x, choice))


def test_wider_groups_are_held_as_groups_of_128_and_others_refused() -> None:
    wide = _int4(4, 512, seed=1, group=512)  # one group a row
    held = int4_groups(wide)
    assert held.group_size == 128 and torch.equal(held.dequantize(), wide.dequantize())
    assert int4_groups(_int4(4, 128, seed=2, group=64)).group_size == 64
    with pytest.raises(ValueError, match="groups of 32, 64, 128 inputs or multiples of 128, not 96"):
        int4_groups(_int4(4, 192, seed=3, group=96))


def test_dense_experts_are_quantized_per_128_inputs() -> None:
    kept = FusedMoE(SPEC)
    kept.keep_int4(CPU)
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    kept.load_expert("experts", 1, DOWN, weight)
    assert kept.int4 is not None and kept.int4.group_size == 128
    _, widened = kept.int4.expert_weights(1, torch.float32)
    assert torch.equal(widened, quantize_int4_groups(weight, 128).dequantize())


def test_a_second_group_size_in_one_layer_is_refused() -> None:
    kept = FusedMoE(SPEC)
    kept.keep_int4(CPU)
    kept.load_expert("experts", 0, GATE, _int4(256, 128, seed=1, group=32))
    with pytest.raises(ValueError, match="groups of 64 and 32 inputs in one layer"):
        kept.load_expert("experts", 0, UP, _int4(256, 128, seed=2, group=64))


def test_tensor_parallel_ranks_keep_their_share_of_the_stacks() -> None:
    """Two ranks, each with half of every expert's gate/up rows and down columns (whole groups),
    sum to the single rank's output."""
    spec = replace(SPEC, intermediate_size=256)
    single, _ = _loaded_pair(spec)
    ranks = rank_layers(spec, "int4", _int4)
    assert all(layer.int4 is not None and layer.int4.down.shape == (6, 128, 128) for layer in ranks)
    assert_ranks_sum_to_one_rank(single, ranks)


def test_the_stacks_are_chosen_for_4_bit_experts_of_whole_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = built_moe_model(tmp_path / "whole", overrides=WHOLE)
    layers = sum(isinstance(m, FusedMoE) for m in whole.modules())
    per_expert = {
        name.replace(".experts.", ".experts.0."): INT4_QTYPE
        for name in weight_methods.expert_types(whole, INT4_QTYPE)
    }
    block = dict.fromkeys(per_expert, BLOCK_FP8_QTYPE)
    int4 = {"fp8": 0, "int4": layers, "dense": layers}  # (a stood-in layer is given dense stacks too)
    assert experts_chosen(whole, monkeypatch, per_expert) == int4
    assert experts_chosen(whole, monkeypatch, {}, quantization="w4a16") == int4
    assert experts_chosen(whole, monkeypatch, block, quantization="w4a16") == int4
    # Sizes that are not whole groups of 128 (the tiny model's 64-wide hidden size) stay dense.
    narrow = built_moe_model(tmp_path / "narrow")
    narrow_layers = sum(isinstance(m, FusedMoE) for m in narrow.modules())
    dense = {"fp8": 0, "int4": 0, "dense": narrow_layers}
    assert experts_chosen(narrow, monkeypatch, {}, quantization="w4a16") == dense


def _int4_moe_checkpoint(tmp_path: Path, fmt: str = "gptq") -> Path:
    """A Qwen3-MoE checkpoint (whole 128-input groups) whose linears and experts are 4-bit in groups of
    32, stored as `fmt` ("gptq", "awq", compressed-tensors "ct") stores them."""
    dense = write_random_model(tmp_path / "dense", "qwen3_moe", WHOLE, seed=4)
    symmetric = fmt == "ct"
    packer = {"gptq": gptq_tensors, "awq": awq_tensors, "ct": compressed_int4_tensors}[fmt]

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        rows, cols = weight.shape
        return packer(random_int4(rows, cols, 32, symmetric, seed=len(module) + rows)), None

    configs = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
        "ct": compressed_config(
            {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
            None,
            "pack-quantized",
        ),
    }
    rewrite_checkpoint(dense, tmp_path / fmt, configs[fmt], convert)
    return tmp_path / fmt


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
def test_a_4_bit_checkpoints_experts_stay_4_bit_and_serve_as_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    assert_checkpoint_serves_as_dense(_int4_moe_checkpoint(tmp_path, fmt), monkeypatch, "int4")


def test_random_weights_under_quantization_w4a16_are_random_4_bit_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_random_model(tmp_path, "qwen3_moe", WHOLE)
    std = json.loads((path / "config.json").read_text())["initializer_range"]
    for stacks in (m.int4 for m in random_moe_experts(path, "w4a16", monkeypatch)):
        assert stacks is not None and stacks.group_size == 128
        gate_up, _ = stacks.expert_weights(0, torch.float32)
        assert 0.5 < gate_up.std().item() / std < 2


def test_the_grouped_gemm_widens_4_bit_groups_exactly_under_the_triton_interpreter() -> None:
    """Each 4-bit tile is widened to the very values of the dequantized stack (a nibble, scale or
    zero point read wrongly would be off by far more than the summation order's rounding)."""
    run_interpreted(widening_script("int4"), WIDENS_EXACTLY)


def test_a_stack_of_the_wrong_form_is_refused() -> None:
    codes = torch.zeros(2, 8, 32, dtype=torch.uint8)
    groups = torch.zeros(2, 8, 2)
    with pytest.raises(ValueError, match="do not fit codes"):
        Int4Stack(codes, groups, torch.zeros(2, 8, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="64 inputs do not split into 3 whole groups"):
        Int4Stack(codes, torch.zeros(2, 8, 3), torch.zeros(2, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scales are floats"):
        Int4Stack(codes, groups.int(), torch.zeros(2, 8, 2, dtype=torch.uint8))
    stack = Int4Stack(codes, groups, torch.zeros(2, 8, 2, dtype=torch.uint8))
    assert stack.shape == (2, 8, 64) and stack.group_size == 32
