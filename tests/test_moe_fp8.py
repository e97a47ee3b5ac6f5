"""Experts kept as FP8 stacks (a GPU's form of an FP8 checkpoint's experts, or of dense ones under
--quantization fp8), on the CPU: the stacks hold a checkpoint's very codes and scales and widen to the
values its dequantization gives, so a layer holding them computes what the same experts dense
compute; dense experts are quantized one scale a row; the grouped GEMM widens them exactly (Triton's
interpreter); the loader chooses them for FP8 experts (per-expert or stacked names, Mixtral's renamed
ones) and for dense experts under --quantization fp8, on a GPU. The GPU is stood in for here (the
stacks work on any device); tests/gpu/test_moe_fp8_int4_gpu.py runs them on a GPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.moe import DOWN, UP, FusedMoE, MoESpec
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.forms import Fp8Weight, quantize_fp8_rows
from batchlm.layers.quantization.registry import BLOCK_FP8_QTYPE, FP8_QTYPE
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
from quant_checkpoints import compressed_config, fp8_tensors, rewrite_checkpoint

SPEC = MoESpec(num_experts=6, top_k=2, hidden_size=64, intermediate_size=96, renormalize=True)


def _fp8(rows: int, cols: int, seed: int) -> Fp8Weight:
    generator = torch.Generator().manual_seed(seed)
    return quantize_fp8_rows(torch.randn(rows, cols, generator=generator) * 0.05)


def _loaded_pair(spec: MoESpec = SPEC) -> tuple[FusedMoE, FusedMoE]:
    """The same FP8 experts loaded dense (dequantized) and as FP8 stacks."""
    return pair_layers(spec, torch.float32, "fp8", _fp8, CPU)


def test_stacks_hold_the_checkpoint_codes_and_scales() -> None:
    _, kept = _loaded_pair()
    assert kept.fp8 is not None and kept.kept is kept.fp8
    assert kept.gate_up_proj.numel() == 0 and kept.down_proj.numel() == 0
    up = _fp8(96, 64, seed=10 * 4 + UP)
    assert torch.equal(kept.fp8.gate_up.values[4, 96:].view(torch.uint8), up.data.view(torch.uint8))
    assert torch.equal(kept.fp8.gate_up.scales[4, 96:], up.scale)
    down = _fp8(64, 96, seed=10 * 2 + DOWN)
    assert torch.equal(kept.fp8.down.values[2].view(torch.uint8), down.data.view(torch.uint8))
    experts, hidden, inter = SPEC.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    # A byte a weight and four a row's scale.
    assert kept.fp8.nbytes() == experts * (3 * hidden * inter + 4 * (2 * inter + hidden))


def test_a_layer_of_fp8_stacks_computes_as_its_experts_dense() -> None:
    dense, kept = _loaded_pair()
    assert kept.fp8 is not None
    gate_up, down = kept.fp8.expert_weights(3, torch.float32)
    assert torch.equal(gate_up, dense.gate_up_proj[3]) and torch.equal(down, dense.down_proj[3])
    x = torch.randn(9, SPEC.hidden_size, generator=torch.Generator().manual_seed(6))
    choice = route_top_k(torch.randn(9, 6, generator=torch.Generator().manual_seed(7)), 2, True)
    with torch.no_grad():
        assert torch.equal(kept(x, choice), dense(x, choice))


def test_dense_experts_are_quantized_one_scale_a_row() -> None:
    kept = FusedMoE(SPEC)
    kept.keep_fp8(CPU)
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    weight[5] *= 1000.0  # one row's scale leaves the others' alone
    kept.load_expert("experts", 1, DOWN, weight)
    assert kept.fp8 is not None
    assert torch.equal(kept.fp8.down.scales[1], quantize_fp8_rows(weight).scale)
    _, widened = kept.fp8.expert_weights(1, torch.float32)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, relative to its row's largest.
    error = (widened - weight).abs().amax(dim=1) / weight.abs().amax(dim=1)
    assert error.max() <= 1 / 16


def test_tensor_parallel_ranks_keep_their_share_of_the_stacks() -> None:
    """Two ranks, each with half of every expert's gate/up rows and down columns (a row's scale kept
    whole), sum to the single rank's output."""
    spec = replace(SPEC, intermediate_size=128)
    single, _ = _loaded_pair(spec)
    ranks = rank_layers(spec, "fp8", _fp8)
    assert all(layer.fp8 is not None and layer.fp8.down.shape == (6, 64, 64) for layer in ranks)
    assert_ranks_sum_to_one_rank(single, ranks)


def test_the_stacks_are_chosen_for_fp8_experts_on_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = built_moe_model(tmp_path)
    layers = sum(isinstance(m, FusedMoE) for m in model.modules())
    assert layers > 0
    stacked = weight_methods.expert_types(model, FP8_QTYPE)
    # A checkpoint's names: one tensor an expert (`experts.<e>.gate_proj.weight`).
    per_expert = {name.replace(".experts.", ".experts.3."): qtype for name, qtype in stacked.items()}
    block = dict.fromkeys(per_expert, BLOCK_FP8_QTYPE)
    fp8, dense = {"fp8": layers, "int4": 0, "dense": layers}, {"fp8": 0, "int4": 0, "dense": layers}
    assert experts_chosen(model, monkeypatch, stacked) == fp8
    assert experts_chosen(model, monkeypatch, per_expert) == fp8
    # Block-wise FP8 experts: requantized per row as its linears are (4-bit ones under w4a16, where
    # the sizes are whole 128-input groups: not this tiny model's).
    assert experts_chosen(model, monkeypatch, block) == fp8
    assert experts_chosen(model, monkeypatch, block, quantization="w4a16") == dense
    # Dense experts: only under --quantization fp8.
    assert experts_chosen(model, monkeypatch, {}) == dense
    assert experts_chosen(model, monkeypatch, {}, quantization="fp8") == fp8
    # On a CPU they stay dense.
    assert weight_methods.gpu_experts_form((FP8_QTYPE,), None, torch.device("cpu")) is None


def test_mixtral_experts_are_found_under_their_checkpoint_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = built_moe_model(tmp_path, "mixtral")
    layers = sum(isinstance(m, FusedMoE) for m in model.modules())
    names = {
        f"model.layers.{layer}.block_sparse_moe.experts.0.{w}.weight": FP8_QTYPE
        for layer in range(layers)
        for w in ("w1", "w2", "w3")
    }
    assert experts_chosen(model, monkeypatch, names)["fp8"] == layers


def _fp8_moe_checkpoint(tmp_path: Path) -> Path:
    # Contexts as long as the GPU test's arrivals (up to 1,199-token prompts).
    dense = write_random_model(tmp_path / "dense", "qwen3_moe", {"max_position_embeddings": 2048}, seed=4)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        return fp8_tensors(weight, per_tensor=False, input_scale=None), None

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    inputs = {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}
    config = compressed_config(weights, inputs, "float-quantized")
    rewrite_checkpoint(dense, tmp_path / "fp8", config, convert)
    return tmp_path / "fp8"


def test_an_fp8_checkpoints_experts_stay_fp8_and_serve_as_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_checkpoint_serves_as_dense(_fp8_moe_checkpoint(tmp_path), monkeypatch, "fp8")


def test_random_weights_under_quantization_fp8_are_random_fp8_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experts = random_moe_experts(write_random_model(tmp_path, "qwen3_moe"), "fp8", monkeypatch)
    for stacks in (m.fp8 for m in experts):
        assert stacks is not None
        for stack in (stacks.gate_up, stacks.down):
            assert stack.values.dtype == FP8_DTYPE and bool((stack.scales > 0).all())
            # Each row's largest value is the format's largest: quantized one scale a row.
            assert torch.equal(stack.values.float().abs().amax(dim=-1), torch.full_like(stack.scales, 448.0))


@pytest.mark.parametrize("form", ["fp8", "fp8-bits"], ids=["e4m3-conversion", "bit-placement"])
def test_the_grouped_gemm_widens_fp8_exactly_under_the_triton_interpreter(form: str) -> None:
    """Each FP8 tile is widened to the very values of the dequantized stack, by the e4m3 conversion
    (Ada, Hopper) or by placing the bits in a float's (earlier GPUs): a row's scale or a code read
    wrongly would be off by far more than the summation order's rounding."""
    run_interpreted(widening_script(form), WIDENS_EXACTLY)


def test_a_stack_of_the_wrong_form_is_refused() -> None:
    values = torch.zeros(2, 8, 16, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="do not fit values"):
        Fp8Stack(values, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn values and float32 scales"):
        Fp8Stack(values.float(), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="contiguous"):
        Fp8Stack(torch.zeros(2, 16, 8, dtype=FP8_DTYPE).transpose(1, 2), torch.zeros(2, 8))
    assert Fp8Stack(values, torch.zeros(2, 8)).shape == (2, 8, 16)
