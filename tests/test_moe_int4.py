"""Experts kept as 4-bit stacks (a GPU's form of a GPTQ, AWQ or compressed-tensors checkpoint's experts,
or of dense ones under --quantization w4a16), on the CPU: the stacks hold a checkpoint's very codes,
scales and zero points and widen to the values its dequantization gives, so a layer holding them
computes what the same experts dense compute; groups wider than 128 inputs are held as groups of 128;
dense experts are quantized per 128 inputs; the grouped GEMM widens them exactly (Triton's
interpreter); the loader chooses them for 4-bit experts and under --quantization w4a16, on a GPU.
The choice on a GPU is stood in for here (the stacks run on any device); tests/gpu/test_moe_int4_gpu.py
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
from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from interpreter_harness import run_interpreted
from models_harness import CPU, PROMPTS, greedy_generate, run_ranks, thread_groups
from quant_checkpoints import gptq_tensors, random_int4, rewrite_checkpoint
from test_moe_fp8 import CUDA, _built, _chosen

SPEC = MoESpec(num_experts=6, top_k=2, hidden_size=128, intermediate_size=256, renormalize=True)
# Sizes of whole 128-input groups, as 4-bit experts need.
WHOLE = {"hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256, "head_dim": 32}


def _int4(rows: int, cols: int, seed: int, group: int = 32) -> Int4Weight:
    return random_int4(rows, cols, group, symmetric=False, seed=seed)


def _loaded_pair(spec: MoESpec = SPEC, group: int = 32) -> tuple[FusedMoE, FusedMoE]:
    """The same 4-bit experts loaded dense (dequantized) and as 4-bit stacks."""
    dense, kept = FusedMoE(spec), FusedMoE(spec)
    kept.keep_int4(CPU)
    inter, hidden = spec.intermediate_size, spec.hidden_size
    for expert in range(spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (hidden, inter) if part == DOWN else (inter, hidden)
            weight = _int4(rows, cols, seed=10 * expert + part, group=group)
            for layer in (dense, kept):
                layer.load_expert("experts", expert, part, weight)
    assert kept.missing_parts() == [] and dense.missing_parts() == []
    return dense, kept


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
    groups = thread_groups(2)
    ranks = [FusedMoE(spec, groups[rank]) for rank in range(2)]
    for layer in ranks:
        layer.keep_int4(CPU)
        for expert in range(spec.num_experts):
            for part in (GATE, UP, DOWN):
                rows, cols = (128, 256) if part == DOWN else (256, 128)
                layer.load_expert("experts", expert, part, _int4(rows, cols, seed=10 * expert + part))
        assert layer.int4 is not None and layer.int4.down.shape == (6, 128, 128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(8))
    choice = route_top_k(torch.randn(5, 6, generator=torch.Generator().manual_seed(9)), 2, True)
    with torch.no_grad():
        expected = single(x, choice)
        outputs = run_ranks(lambda rank: ranks[rank](x, choice), 2)
    scale = expected.abs().max().item()
    for output in outputs:  # the same products, the halves summed apart (float32 rounding)
        torch.testing.assert_close(output, expected, atol=1e-5 * scale, rtol=1e-5)


def _stand_in_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts are chosen on this CPU as on a GPU (their stacks run on any device)."""
    choose = weight_methods.gpu_experts_form
    monkeypatch.setattr(
        weight_methods,
        "gpu_experts_form",
        lambda types, quantization, device: choose(types, quantization, CUDA),
    )


def test_the_stacks_are_chosen_for_4_bit_experts_of_whole_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded: list[torch.device] = []
    monkeypatch.setattr(FusedMoE, "keep_int4", lambda self, device: recorded.append(device))
    whole = _built(tmp_path / "whole", overrides=WHOLE)
    layers = sum(isinstance(m, FusedMoE) for m in whole.modules())
    per_expert = {
        name.replace(".experts.", ".experts.0."): INT4_QTYPE
        for name in weight_methods.expert_types(whole, INT4_QTYPE)
    }
    block = dict.fromkeys(per_expert, BLOCK_FP8_QTYPE)
    for qtypes, quantization in ((per_expert, None), ({}, "w4a16"), (block, "w4a16")):
        recorded.clear()  # (the stand-in keeps nothing, so dense stacks are allocated after it)
        assert _chosen(whole, monkeypatch, qtypes, fp8_gpu=False, quantization=quantization) == (0, layers)
        assert recorded == [CUDA] * layers
    # Sizes that are not whole groups of 128 (the tiny model's 64-wide hidden size) stay dense.
    recorded.clear()
    narrow = _built(tmp_path / "narrow")
    narrow_layers = sum(isinstance(m, FusedMoE) for m in narrow.modules())
    assert _chosen(narrow, monkeypatch, {}, fp8_gpu=False, quantization="w4a16") == (0, narrow_layers)
    assert recorded == []


def _gptq_moe_checkpoint(tmp_path: Path) -> Path:
    dense = write_random_model(tmp_path / "dense", "qwen3_moe", WHOLE, seed=4)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        rows, cols = weight.shape
        return gptq_tensors(random_int4(rows, cols, 32, symmetric=False, seed=len(module) + rows)), None

    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
    rewrite_checkpoint(dense, tmp_path / "gptq", config, convert)
    return tmp_path / "gptq"


def test_a_gptq_checkpoints_experts_stay_4_bit_and_serve_as_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _gptq_moe_checkpoint(tmp_path)
    as_dense = load_model(model_dir, torch.float32, CPU, progress=False)
    _stand_in_a_gpu(monkeypatch)
    as_int4 = load_model(model_dir, torch.float32, CPU, progress=False)
    dense_experts = [m for m in as_dense.model.modules() if isinstance(m, FusedMoE)]
    int4_experts = [m for m in as_int4.model.modules() if isinstance(m, FusedMoE)]
    assert dense_experts and all(m.kept is None for m in dense_experts)
    assert all(m.int4 is not None and m.gate_up_proj.numel() == 0 for m in int4_experts)
    for prompt in PROMPTS:  # the same weights, the same products: the same tokens and logprobs
        tokens, logprobs = greedy_generate(as_int4, prompt, 6)
        dense_tokens, dense_logprobs = greedy_generate(as_dense, prompt, 6)
        assert tokens == dense_tokens and torch.equal(logprobs, dense_logprobs)


def test_random_weights_under_quantization_w4a16_are_random_4_bit_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_random_model(tmp_path, "qwen3_moe", WHOLE)
    _stand_in_a_gpu(monkeypatch)
    loaded = load_model(path, torch.float32, CPU, random_weights=True, quantization="w4a16", progress=False)
    std = json.loads((path / "config.json").read_text())["initializer_range"]
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.int4 is not None and m.int4.group_size == 128 for m in experts)
    for stacks in (m.int4 for m in experts):
        assert stacks is not None
        gate_up, _ = stacks.expert_weights(0, torch.float32)
        assert 0.5 < gate_up.std().item() / std < 2


INTERPRET_CHECK = """
import torch
from batchlm.kernels.int4_stack import Int4Stack
from batchlm.kernels.moe_gemm import grouped_gemm
from batchlm.layers.moe_routing import align_to_blocks, route_top_k
generator = torch.Generator().manual_seed(0)
experts, tokens, top_k = 5, 9, 2
# Both tile shapes (n <= 64 takes narrower tiles), N not whole tiles; groups of 32, 64 and 128.
for n, k, group in ((72, 256, 32), (40, 128, 64), (96, 256, 128)):
    codes = torch.randint(0, 256, (experts, n, k // 2), generator=generator, dtype=torch.uint8)
    scales = torch.rand(experts, n, k // group, generator=generator) * 0.01 + 1e-4
    zeros = torch.randint(0, 17, (experts, n, k // group), generator=generator, dtype=torch.uint8)
    stack = Int4Stack(codes, scales, zeros)
    values = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2).float()
    dense32 = (values - zeros.float().repeat_interleave(group, -1)) * scales.repeat_interleave(group, -1)
    x = torch.randn(tokens, k, generator=generator)
    choice = route_top_k(torch.randn(tokens, experts, generator=generator), top_k, True)
    # float16 stands for the half types: the interpreter rounds bfloat16 toward zero (numpy has none).
    for dtype in (torch.float32, torch.float16):
        dense = dense32.to(dtype)
        for block_m in (16, 32):
            blocks = align_to_blocks(choice.experts, experts, block_m)
            got = grouped_gemm(x.to(dtype), stack, blocks, top_k, choice.weights.reshape(-1))
            want = grouped_gemm(x.to(dtype), dense, blocks, top_k, choice.weights.reshape(-1))
            scale = want.float().abs().max().item()
            tolerance = 1e-6 if dtype == torch.float32 else 1e-3
            error = (got.float() - want.float()).abs().max().item()
            assert error <= tolerance * scale, (n, k, group, dtype, block_m, error, scale)
print("int4 grouped gemm ok")
"""


def test_the_grouped_gemm_widens_4_bit_groups_exactly_under_the_triton_interpreter() -> None:
    """Each 4-bit tile is widened to the very values of the dequantized stack (a nibble, scale or
    zero point read wrongly would be off by far more than the summation order's rounding)."""
    run_interpreted(INTERPRET_CHECK, "int4 grouped gemm ok")


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
