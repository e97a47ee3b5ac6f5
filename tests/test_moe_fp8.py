"""Experts kept as FP8 stacks (a GPU's form of an FP8 checkpoint's experts, or of dense ones under
--quantization fp8), on the CPU: the stacks hold a checkpoint's very codes and scales and widen to the
values its dequantization gives, so a layer holding them computes what the same experts dense
compute; dense experts are quantized one scale a row; the grouped GEMM widens them exactly (Triton's
interpreter); the loader chooses them for FP8 experts (per-expert or stacked names, Mixtral's renamed
ones) and for dense experts under --quantization fp8, only where the GPU has FP8. FP8 support is
stood in for here (the stacks work on any device); tests/gpu/test_moe_fp8_gpu.py runs them on a GPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.fp8_types import FP8_DTYPE
from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.forms import Fp8Weight, quantize_fp8_rows
from batchlm.layers.quantization.registry import BLOCK_FP8_QTYPE, DENSE_FORMAT, FP8_QTYPE
from batchlm.models import weight_methods
from batchlm.models.base import CausalLM
from batchlm.models.checkpoint import load_hf_config
from batchlm.models.loader import load_model
from batchlm.models.random_model import write_random_model
from batchlm.models.registry import get_model_class
from interpreter_harness import run_interpreted
from models_harness import CPU, PROMPTS, greedy_generate, run_ranks, thread_groups
from quant_checkpoints import compressed_config, fp8_tensors, rewrite_checkpoint

CUDA = torch.device("cuda")
SPEC = MoESpec(num_experts=6, top_k=2, hidden_size=64, intermediate_size=96, renormalize=True)


def _fp8(rows: int, cols: int, seed: int) -> Fp8Weight:
    generator = torch.Generator().manual_seed(seed)
    return quantize_fp8_rows(torch.randn(rows, cols, generator=generator) * 0.05)


def _loaded_pair(spec: MoESpec = SPEC) -> tuple[FusedMoE, FusedMoE]:
    """The same FP8 experts loaded dense (dequantized) and as FP8 stacks."""
    dense, kept = FusedMoE(spec), FusedMoE(spec)
    kept.keep_fp8(CPU)
    inter, hidden = spec.intermediate_size, spec.hidden_size
    for expert in range(spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (hidden, inter) if part == DOWN else (inter, hidden)
            weight = _fp8(rows, cols, seed=10 * expert + part)
            for layer in (dense, kept):
                layer.load_expert("experts", expert, part, weight)
    assert kept.missing_parts() == [] and dense.missing_parts() == []
    return dense, kept


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
    groups = thread_groups(2)
    ranks = [FusedMoE(spec, groups[rank]) for rank in range(2)]
    for layer in ranks:
        layer.keep_fp8(CPU)
        for expert in range(spec.num_experts):
            for part in (GATE, UP, DOWN):
                rows, cols = (64, 128) if part == DOWN else (128, 64)
                layer.load_expert("experts", expert, part, _fp8(rows, cols, seed=10 * expert + part))
        assert layer.fp8 is not None and layer.fp8.down.shape == (6, 64, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8))
    choice = route_top_k(torch.randn(5, 6, generator=torch.Generator().manual_seed(9)), 2, True)
    with torch.no_grad():
        expected = single(x, choice)
        outputs = run_ranks(lambda rank: ranks[rank](x, choice), 2)
    scale = expected.abs().max().item()
    for output in outputs:  # the same products, the halves summed apart (float32 rounding)
        torch.testing.assert_close(output, expected, atol=1e-5 * scale, rtol=1e-5)


def _built(
    tmp_path: Path, model_type: str = "qwen3_moe", overrides: dict[str, Any] | None = None
) -> CausalLM:
    path = write_random_model(tmp_path, model_type, overrides)
    config = load_hf_config(path)
    model_class = get_model_class(config.architectures[0])
    model: CausalLM = model_class(model_class.read_config(config))
    return model


def _chosen(
    model: CausalLM, monkeypatch: pytest.MonkeyPatch, qtypes: dict[str, str], fp8_gpu: bool, **kwargs: Any
) -> tuple[int, int]:
    """(layers kept FP8, layers given dense stacks) when the methods are assigned on a GPU with FP8
    (`fp8_gpu`) or one without (nothing is allocated on a GPU)."""
    kept: list[torch.device] = []
    dense: list[torch.device] = []
    monkeypatch.setattr(FusedMoE, "keep_fp8", lambda self, device: kept.append(device))
    monkeypatch.setattr(FusedMoE, "allocate_dense", lambda self, device: dense.append(device))
    monkeypatch.setattr(weight_methods, "has_fp8_tensor_cores", lambda device: fp8_gpu)
    cuda = torch.device("cuda")
    methods = weight_methods.assign_weight_methods(
        model, DENSE_FORMAT, qtypes, cuda, torch.bfloat16, **kwargs
    )
    assert methods["FP8 experts"] == len(kept)
    return len(kept), len(dense)


def test_the_stacks_are_chosen_for_fp8_experts_on_a_gpu_with_fp8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _built(tmp_path)
    layers = sum(isinstance(m, FusedMoE) for m in model.modules())
    assert layers > 0
    stacked = weight_methods.expert_types(model, FP8_QTYPE)
    # A checkpoint's names: one tensor an expert (`experts.<e>.gate_proj.weight`).
    per_expert = {name.replace(".experts.", ".experts.3."): qtype for name, qtype in stacked.items()}
    block = dict.fromkeys(per_expert, BLOCK_FP8_QTYPE)
    assert _chosen(model, monkeypatch, stacked, fp8_gpu=True) == (layers, layers)
    assert _chosen(model, monkeypatch, per_expert, fp8_gpu=True) == (layers, layers)
    # Block-wise FP8 experts: requantized per row as its linears are, unless asked otherwise.
    assert _chosen(model, monkeypatch, block, fp8_gpu=True) == (layers, layers)
    assert _chosen(model, monkeypatch, block, fp8_gpu=True, quantization="w4a16") == (0, layers)
    # Dense experts: only under --quantization fp8.
    assert _chosen(model, monkeypatch, {}, fp8_gpu=True) == (0, layers)
    assert _chosen(model, monkeypatch, {}, fp8_gpu=True, quantization="fp8") == (layers, layers)
    # A GPU without FP8 (or a CPU) keeps them dense.
    assert _chosen(model, monkeypatch, per_expert, fp8_gpu=False) == (0, layers)


def test_mixtral_experts_are_found_under_their_checkpoint_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _built(tmp_path, "mixtral")
    layers = sum(isinstance(m, FusedMoE) for m in model.modules())
    names = {
        f"model.layers.{layer}.block_sparse_moe.experts.0.{w}.weight": FP8_QTYPE
        for layer in range(layers)
        for w in ("w1", "w2", "w3")
    }
    assert _chosen(model, monkeypatch, names, fp8_gpu=True) == (layers, layers)


def stand_in_a_gpu_with_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Experts are chosen on this CPU as on a GPU with FP8 (their stacks run on any device)."""
    choose = weight_methods.gpu_experts_form
    monkeypatch.setattr(weight_methods, "has_fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(
        weight_methods,
        "gpu_experts_form",
        lambda types, quantization, device: choose(types, quantization, CUDA),
    )


def _fp8_moe_checkpoint(tmp_path: Path) -> Path:
    dense = write_random_model(tmp_path / "dense", "qwen3_moe", seed=4)

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
    model_dir = _fp8_moe_checkpoint(tmp_path)
    as_dense = load_model(model_dir, torch.float32, CPU, progress=False)
    stand_in_a_gpu_with_fp8(monkeypatch)
    as_fp8 = load_model(model_dir, torch.float32, CPU, progress=False)
    dense_experts = [m for m in as_dense.model.modules() if isinstance(m, FusedMoE)]
    fp8_experts = [m for m in as_fp8.model.modules() if isinstance(m, FusedMoE)]
    assert dense_experts and all(m.kept is None for m in dense_experts)
    assert all(m.fp8 is not None and m.gate_up_proj.numel() == 0 for m in fp8_experts)
    for prompt in PROMPTS:  # the same weights, the same products: the same tokens and logprobs
        tokens, logprobs = greedy_generate(as_fp8, prompt, 6)
        dense_tokens, dense_logprobs = greedy_generate(as_dense, prompt, 6)
        assert tokens == dense_tokens and torch.equal(logprobs, dense_logprobs)


def test_random_weights_under_quantization_fp8_are_random_fp8_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_random_model(tmp_path, "qwen3_moe")
    stand_in_a_gpu_with_fp8(monkeypatch)
    loaded = load_model(path, torch.float32, CPU, random_weights=True, quantization="fp8", progress=False)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.fp8 is not None for m in experts)
    for stacks in (m.fp8 for m in experts):
        assert stacks is not None
        for stack in (stacks.gate_up, stacks.down):
            assert stack.values.dtype == FP8_DTYPE and bool((stack.scales > 0).all())
            # Each row's largest value is the format's largest: quantized one scale a row.
            assert torch.equal(stack.values.float().abs().amax(dim=-1), torch.full_like(stack.scales, 448.0))


INTERPRET_CHECK = """
import torch
from batchlm.kernels.fp8_stack import Fp8Stack
from batchlm.kernels.moe_gemm import grouped_gemm
from batchlm.layers.moe_routing import align_to_blocks, route_top_k
generator = torch.Generator().manual_seed(0)
experts, tokens, top_k = 5, 9, 2
for n, k in ((72, 96), (40, 64)):  # both tile shapes (n <= 64 takes 32-wide K steps); N not whole tiles
    values = (torch.randn(experts, n, k, generator=generator) * 100).to(torch.float8_e4m3fn)
    scales = torch.rand(experts, n, generator=generator) * 0.01 + 1e-4
    stack = Fp8Stack(values, scales)
    x = torch.randn(tokens, k, generator=generator)
    choice = route_top_k(torch.randn(tokens, experts, generator=generator), top_k, True)
    # float16 stands for the half types: the interpreter rounds bfloat16 toward zero (numpy has none).
    for dtype in (torch.float32, torch.float16):
        dense = (values.float() * scales[..., None]).to(dtype)
        for block_m in (16, 32):
            blocks = align_to_blocks(choice.experts, experts, block_m)
            got = grouped_gemm(x.to(dtype), stack, blocks, top_k, choice.weights.reshape(-1))
            want = grouped_gemm(x.to(dtype), dense, blocks, top_k, choice.weights.reshape(-1))
            # The same products; numpy may sum a transposed tile in another order (float32 rounding),
            # and the output's rounding to float16 may then differ by an ulp.
            scale = want.float().abs().max().item()
            tolerance = 1e-6 if dtype == torch.float32 else 1e-3
            error = (got.float() - want.float()).abs().max().item()
            assert error <= tolerance * scale, (n, k, dtype, block_m, error, scale)
print("fp8 grouped gemm ok")
"""


def test_the_grouped_gemm_widens_fp8_exactly_under_the_triton_interpreter() -> None:
    """Each FP8 tile is widened to the very values of the dequantized stack (a row's scale or a code
    read wrongly would be off by far more than the summation order's rounding)."""
    run_interpreted(INTERPRET_CHECK, "fp8 grouped gemm ok")


def test_a_stack_of_the_wrong_form_is_refused() -> None:
    values = torch.zeros(2, 8, 16, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="do not fit values"):
        Fp8Stack(values, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn values and float32 scales"):
        Fp8Stack(values.float(), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="contiguous"):
        Fp8Stack(torch.zeros(2, 16, 8, dtype=FP8_DTYPE).transpose(1, 2), torch.zeros(2, 8))
    assert Fp8Stack(values, torch.zeros(2, 8)).shape == (2, 8, 16)
