"""MXFP4 experts kept as MXFP4 stacks (a GPU's form of gpt-oss's experts), on the CPU: the stacks hold
the checkpoint's very bytes, widen to exactly the values GGUF's decoding gives, and a layer holding them
computes what the same experts dense compute; the grouped GEMM widens them exactly (Triton's
interpreter); models build with no dense stacks where the experts stay MXFP4, and the loader chooses
the stacks only for MXFP4 experts on a CUDA device. tests/gpu/test_moe_mxfp4_gpu.py runs them there."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from batchlm.kernels.mxfp4_layout import Mxfp4Stack
from batchlm.layers.activation import CLAMPED_SWIGLU
from batchlm.layers.moe import DOWN, GATE, UP, FusedMoE, MoESpec, stacks_allocated_later
from batchlm.layers.moe_mxfp4 import dequantize, stack_rows
from batchlm.layers.moe_routing import route_top_k
from batchlm.layers.quantization.base import QuantizedTensor
from batchlm.layers.quantization.registry import DENSE_FORMAT
from batchlm.models import weight_methods
from batchlm.models.base import CausalLM
from batchlm.models.checkpoint import load_hf_config
from batchlm.models.loader import load_model
from batchlm.models.mxfp4_weights import mxfp4_weight
from batchlm.models.random_model import write_random_model
from batchlm.models.registry import get_model_class
from expert_stacks_harness import WIDENS_EXACTLY, assert_ranks_sum_to_one_rank, widening_script
from interpreter_harness import run_interpreted
from models_harness import thread_groups

SPEC = MoESpec(
    num_experts=6, top_k=2, hidden_size=64, intermediate_size=96, renormalize=True,
    hidden_act=CLAMPED_SWIGLU, act_options=(("alpha", 1.702), ("limit", 7.0)), router_bias=True,
    expert_bias=True,
)  # fmt: skip


def _pair(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random HF MXFP4 pair: blocks uint8 [rows, cols / 32, 16], scales [rows, cols / 32]."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(118, 131, (rows, cols // 32), generator=generator, dtype=torch.uint8)
    return blocks, scales


def test_stacks_hold_the_checkpoint_bytes_and_widen_as_gguf_decodes() -> None:
    blocks, scales = _pair(40, 96, seed=1)
    scales[0, 0], scales[1, 1] = 0, 1  # the smallest scales: 2^-127 (a float32 subnormal) and 2^-126
    weight = mxfp4_weight(blocks, scales)  # GGUF's blocks, as the loader hands them over
    codes, exponents = stack_rows(weight, torch.device("cpu"))
    assert torch.equal(codes, blocks.reshape(40, 48)) and torch.equal(exponents, scales)
    expected = weight.dequantize(torch.float32)
    assert torch.equal(dequantize(codes, exponents, torch.float32), expected)
    assert torch.equal(dequantize(codes, exponents, torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(expected.to(torch.bfloat16).float(), expected)  # MXFP4 values are exact in bf16


def test_other_weights_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="MXFP4 experts load MXFP4 blocks, not Tensor weights"):
        stack_rows(torch.zeros(4, 32), torch.device("cpu"))
    q8 = QuantizedTensor("Q8_0", torch.zeros(4, 34, dtype=torch.uint8), 32, 32, 34)
    with pytest.raises(ValueError, match="not Q8_0 weights"):
        stack_rows(q8, torch.device("cpu"))
    with pytest.raises(ValueError, match="whole 32-input groups"):
        FusedMoE(MoESpec(4, 2, hidden_size=64, intermediate_size=48, renormalize=True)).keep_mxfp4(
            torch.device("cpu")
        )


def _loaded_pair(spec: MoESpec = SPEC) -> tuple[FusedMoE, FusedMoE]:
    """The same MXFP4 experts (and biases) loaded dense and as MXFP4 stacks."""
    dense, kept = FusedMoE(spec), FusedMoE(spec)
    kept.keep_mxfp4(torch.device("cpu"))
    inter, hidden = spec.intermediate_size, spec.hidden_size
    for expert in range(spec.num_experts):
        for part in (GATE, UP, DOWN):
            rows, cols = (hidden, inter) if part == DOWN else (inter, hidden)
            weight = mxfp4_weight(*_pair(rows, cols, seed=10 * expert + part))
            for layer in (dense, kept):
                layer.load_expert("experts", expert, part, weight)
    for layer in (dense, kept):
        assert layer.gate_up_proj_bias is not None and layer.down_proj_bias is not None
        with torch.no_grad():
            layer.gate_up_proj_bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
            layer.down_proj_bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    assert kept.missing_parts() == [] and dense.missing_parts() == []
    return dense, kept


def test_a_layer_of_mxfp4_stacks_computes_as_its_experts_dense() -> None:
    dense, kept = _loaded_pair()
    assert kept.mxfp4 is not None and kept.gate_up_proj.numel() == 0 and kept.down_proj.numel() == 0
    gate_up, down = kept.mxfp4.expert_weights(3, torch.float32)
    assert torch.equal(gate_up, dense.gate_up_proj[3]) and torch.equal(down, dense.down_proj[3])
    experts, hidden, inter = SPEC.num_experts, SPEC.hidden_size, SPEC.intermediate_size
    assert kept.mxfp4.nbytes() == experts * 3 * hidden * inter * 17 // 32  # 4.25 bits a weight
    x = torch.randn(9, hidden, generator=torch.Generator().manual_seed(6))
    choice = route_top_k(torch.randn(9, experts, generator=torch.Generator().manual_seed(7)), 2, True)
    with torch.no_grad():
        assert torch.equal(kept(x, choice), dense(x, choice))


def test_tensor_parallel_ranks_keep_their_share_of_the_stacks() -> None:
    """Two ranks, each with half of every expert's gate/up rows and down columns (whole 32-input
    groups), sum to the single rank's output."""
    spec = replace(SPEC, intermediate_size=128)
    single, _ = _loaded_pair(spec)
    groups = thread_groups(2)
    ranks = [FusedMoE(spec, groups[rank]) for rank in range(2)]
    for rank, layer in enumerate(ranks):
        layer.keep_mxfp4(torch.device("cpu"))
        for expert in range(spec.num_experts):
            for part in (GATE, UP, DOWN):
                rows, cols = (64, 128) if part == DOWN else (128, 64)
                weight = mxfp4_weight(*_pair(rows, cols, seed=10 * expert + part))
                layer.load_expert("experts", expert, part, weight)
        assert layer.mxfp4 is not None and layer.mxfp4.down.shape == (6, 64, 64)
        assert layer.gate_up_proj_bias is not None and single.gate_up_proj_bias is not None
        assert layer.down_proj_bias is not None and single.down_proj_bias is not None
        with torch.no_grad():
            share = single.gate_up_proj_bias.view(6, 2, 128)[:, :, rank * 64 : (rank + 1) * 64]
            layer.gate_up_proj_bias.copy_(share.reshape(6, 128))
            layer.down_proj_bias.copy_(single.down_proj_bias)
    assert_ranks_sum_to_one_rank(single, ranks)


def test_experts_built_for_later_hold_no_dense_stacks_until_chosen() -> None:
    with stacks_allocated_later():
        later, kept = FusedMoE(SPEC), FusedMoE(SPEC)
    assert FusedMoE(SPEC).gate_up_proj.device.type == "cpu"  # outside the context: allocated at once
    assert later.gate_up_proj.is_meta and later.down_proj.is_meta
    later.allocate_dense(torch.device("cpu"))
    assert later.gate_up_proj.device.type == "cpu" and later.down_proj.shape == (6, 64, 96)
    kept.keep_mxfp4(torch.device("cpu"))
    assert kept.gate_up_proj.numel() == 0 and kept.mxfp4 is not None


def _built(tmp_path: Path) -> CausalLM:
    path = write_random_model(tmp_path, "gpt_oss", {"swiglu_limit": 7.0})
    config = load_hf_config(path)
    model_class = get_model_class(config.architectures[0])
    with stacks_allocated_later():
        model: CausalLM = model_class(model_class.read_config(config))
    return model


def test_the_stacks_are_chosen_for_mxfp4_experts_on_a_cuda_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the experts would go is all that is decided here (nothing is allocated on a GPU)."""
    kept: list[torch.device] = []
    dense: list[torch.device] = []
    monkeypatch.setattr(FusedMoE, "keep_mxfp4", lambda self, device: kept.append(device))
    monkeypatch.setattr(FusedMoE, "allocate_dense", lambda self, device: dense.append(device))
    model = _built(tmp_path)
    layers = sum(isinstance(m, FusedMoE) for m in model.modules())
    types = weight_methods.expert_types(model, "MXFP4")
    assert len(types) == 3 * layers and set(types.values()) == {"MXFP4"}
    cuda = torch.device("cuda")
    methods = weight_methods.assign_weight_methods(model, DENSE_FORMAT, types, cuda, torch.bfloat16)
    assert methods["MXFP4 experts"] == layers and kept == [cuda] * layers and dense == [cuda] * layers
    kept.clear(), dense.clear()
    methods = weight_methods.assign_weight_methods(model, DENSE_FORMAT, {}, cuda, torch.bfloat16)
    assert methods["MXFP4 experts"] == 0 and kept == [] and dense == [cuda] * layers


def test_random_weights_of_an_mxfp4_config_on_the_cpu_are_dense(tmp_path: Path) -> None:
    """Random MXFP4 experts are a GPU's (tests/gpu); elsewhere the config's experts are random dense."""
    path = write_random_model(tmp_path, "gpt_oss", {"swiglu_limit": 7.0})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}})
    )
    loaded = load_model(path, torch.float32, torch.device("cpu"), random_weights=True, progress=False)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(e.mxfp4 is None and not e.gate_up_proj.is_meta for e in experts)
    assert all(e.gate_up_proj.abs().sum() > 0 for e in experts)


def test_the_grouped_gemm_widens_mxfp4_exactly_under_the_triton_interpreter() -> None:
    """Each MXFP4 tile is widened to the very values of the dequantized stack: the same products (a
    nibble or scale read wrongly would be off by far more than the summation order's rounding)."""
    run_interpreted(widening_script("mxfp4"), WIDENS_EXACTLY)


def test_a_stack_of_the_wrong_shape_is_refused() -> None:
    codes = torch.zeros(2, 8, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not fit codes"):
        Mxfp4Stack(codes, torch.zeros(2, 8, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="whole 32-input groups"):
        Mxfp4Stack(torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2, 8, 0, dtype=torch.uint8))
    assert Mxfp4Stack(codes, torch.zeros(2, 8, 1, dtype=torch.uint8)).shape == (2, 8, 32)
