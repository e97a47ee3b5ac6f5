"""FP8 and 4-bit safetensors checkpoints (GPTQ, AWQ, compressed-tensors) on an x86-64 CPU: their
linears and experts run on the quantized CPU kernels, the 4-bit groups as 4-bit blocks of the very
codes (each block's scale the group's, its bias -zero * scale rounded to float16), FP8 values as Q8_0,
instead of the FP8 and W4A16 methods, which would widen every weight at every step here.

Tolerances: the 4-bit blocks hold the checkpoint's values to within a float16 rounding of the bias
(2^-11 of zero * scale). Against a dense twin holding the dequantized weights these 2-layer models'
logits moved by 0.005-0.09% of the largest (4-bit) and 0.7% (FP8, whose values Q8_0 rounds again) on
a CPU with AMX tiles; the kernels' int8 activations elsewhere move them more, so the tests allow what
dense checkpoints quantized at load are allowed (3%, test_cpu_quantized_model.py) and what the FP8
method is (8%).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchlm.kernels import quant_blocks
from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.kernels.quant_panels import QuantizedWeight, dequantize_packed
from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, code_blocks, store
from batchlm.layers.quantization.forms import Int4Weight, Int8Weight
from batchlm.layers.quantization.fp8 import FP8
from batchlm.layers.quantization.int4 import INT4
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.layers.quantization.registry import (
    DENSE_FORMAT,
    FP8_QTYPE,
    INT4_QTYPE,
    WeightSpec,
    choose_linear_method,
    int8_available,
)
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.random_model import write_random_model
from models_harness import CPU, PROMPTS, greedy_generate, run_ranks, thread_groups
from quant_checkpoints import (
    ActOrdered,
    act_order_config,
    act_ordered,
    assert_logits_close,
    awq_tensors,
    compressed_act_order_tensors,
    compressed_config,
    compressed_int4_tensors,
    compressed_int8_tensors,
    dense_twin,
    fp8_tensors,
    gptq8_tensors,
    gptq_act_order_tensors,
    gptq_tensors,
    int8_config,
    int_quantized_tensors,
    random_int4,
    random_int8,
    replace_lm_head,
    rewrite_checkpoint,
    shard_references,
    two_prompt_logits,
)
from test_cpu_fused_decode import _assert_steps_agree as assert_fused_steps_agree

pytestmark = pytest.mark.skipif(not int8_available(), reason="the quantized CPU kernels are unavailable here")

FORMATS = {
    "gptq": (gptq_tensors, {"quant_method": "gptq", "bits": 4, "desc_act": False, "sym": False}),
    "awq": (awq_tensors, {"quant_method": "awq", "bits": 4, "zero_point": True, "version": "gemm"}),
}
# Against the dequantized twin (the module docstring says why these).
ACTIVATIONS_ROUNDED = 0.03
FP8_REQUANTIZED = 0.08


def _int4_config(fmt: str, group: int) -> dict[str, Any]:
    if fmt == "ct":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
        return compressed_config(weights, None, "pack-quantized")
    return {**FORMATS[fmt][1], "group_size": group}


def _int4_checkpoint(
    tmp_path: Path,
    fmt: str,
    model_type: str = "llama",
    overrides: dict[str, Any] | None = None,
    group: int = 32,
) -> tuple[Path, Path, dict[str, Int4Weight]]:
    dense = write_random_model(tmp_path / "dense", model_type, overrides, seed=11)
    packer = compressed_int4_tensors if fmt == "ct" else FORMATS[fmt][0]

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Int4Weight]:
        rows, cols = weight.shape
        w = random_int4(rows, cols, group, fmt == "ct", seed=len(module) * 3 + rows)
        return packer(w), w

    references = rewrite_checkpoint(dense, tmp_path / fmt, _int4_config(fmt, group), convert)
    return dense, tmp_path / fmt, references


def _linears(loaded: LoadedModel) -> dict[str, MethodLayer]:
    return {
        path: m
        for path, m in loaded.model.named_modules()
        if isinstance(m, MethodLayer) and m.role == "linear"
    }


def _bias_rounding(w: Int4Weight | Int8Weight) -> torch.Tensor:
    """Per weight, the most the float16 bias -zero * scale can be off."""
    product = (w.zeros.float() * w.scales.float()).repeat_interleave(w.group_size, dim=1)[:, : w.shape[1]]
    return product * 2.0**-11


def _assert_blocks_of_their_codes(
    loaded: LoadedModel, references: Mapping[str, Int4Weight | Int8Weight], bits: int
) -> None:
    """Every linear on the kernels as `bits`-bit blocks of the checkpoint's codes: their values within
    the float16 rounding of each block's bias."""
    linears = _linears(loaded)
    assert linears and all(layer.method is CPU_QUANTIZED for layer in linears.values())
    for path, layer in linears.items():
        parts = shard_references(references, path)
        packed = store(layer).finish()
        assert isinstance(packed, QuantizedWeight) and packed.bits == bits, path
        expected = torch.cat([w.dequantize() for w in parts])
        bound = torch.cat([_bias_rounding(w) for w in parts])
        assert bool(((dequantize_packed(packed) - expected).abs() <= bound * 1.0001).all()), path


# --- which method a layer takes ---------------------------------------------------------------


@pytest.mark.parametrize("qtype", [INT4_QTYPE, FP8_QTYPE])
def test_a_checkpoints_quantized_linears_take_the_cpu_kernels(
    monkeypatch: pytest.MonkeyPatch, qtype: str
) -> None:
    def spec(device: str, quantization: str | None = None) -> WeightSpec:
        return WeightSpec(
            DENSE_FORMAT, (qtype,) * 3, "linear", torch.device(device), torch.float32, quantization
        )

    assert choose_linear_method(spec("cpu")) is CPU_QUANTIZED
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert choose_linear_method(spec("cuda:0")) is (INT4 if qtype == INT4_QTYPE else FP8)
    # int8 leaves a checkpoint's quantized linears as they are (it takes its dense layers).
    assert choose_linear_method(spec("cpu", "int8")) is CPU_QUANTIZED
    with pytest.raises(ValueError, match="already quantized"):
        choose_linear_method(spec("cpu", "w4a16"))
    # Where the kernels did not build (not x86-64): the methods, widening as they run.
    monkeypatch.setattr(registry, "kernels_available", lambda: False)
    assert choose_linear_method(spec("cpu")) is (INT4 if qtype == INT4_QTYPE else FP8)


# --- 4-bit groups as 4-bit blocks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("cols", "group"), [(256, 128), (96, 64), (64, 32)], ids=["whole", "partial", "block"]
)
def test_4_bit_groups_become_blocks_of_the_same_codes(cols: int, group: int) -> None:
    generator = torch.Generator().manual_seed(3)
    groups = -(-cols // group)
    codes = torch.randint(0, 16, (24, cols), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(24, groups, generator=generator) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 17, (24, groups), generator=generator, dtype=torch.uint8)  # GPTQ's may reach 16
    blocks = code_blocks(Int4Weight(codes, scales, zeros, group))
    assert blocks.bits == 4 and np.array_equal(blocks.codes, codes.numpy())
    expected = (
        codes.float() - zeros.float().repeat_interleave(group, 1)[:, :cols]
    ) * scales.float().repeat_interleave(group, 1)[:, :cols]
    got = torch.from_numpy(quant_blocks.dequantize(blocks))
    bound = (zeros.float() * scales.float()).repeat_interleave(group, 1)[:, :cols] * 2.0**-11
    assert bool(((got - expected).abs() <= bound * 1.0001).all())


def test_groups_that_are_not_whole_blocks_become_q8_0() -> None:
    w = random_int4(8, 96, 48, symmetric=False, seed=1)
    blocks = code_blocks(w)
    assert blocks.bits == 8
    step = np.abs(w.dequantize().numpy()).reshape(8, 3, 32).max(axis=2, keepdims=True) / 127
    error = np.abs(quant_blocks.dequantize(blocks) - w.dequantize().numpy()).reshape(8, 3, 32)
    # Half a step, and the float16 scale's rounding times the largest code (127 * 2^-11 of a step).
    assert bool((error <= step * 0.57).all())


# --- whole checkpoints through the loader ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
def test_a_4_bit_checkpoint_runs_on_the_cpu_kernels_as_its_values(tmp_path: Path, fmt: str) -> None:
    dense, model_dir, references = _int4_checkpoint(tmp_path, fmt)
    loaded = load_model(model_dir, torch.float32, CPU, progress=False)
    _assert_blocks_of_their_codes(loaded, references, bits=4)
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)


@pytest.mark.parametrize("fmt", ["gptq", "ct"])
def test_an_act_order_checkpoint_runs_on_the_cpu_kernels_as_q8_0(tmp_path: Path, fmt: str) -> None:
    # Its groups are not runs of inputs, while a block of the kernels is: the values become Q8_0.
    dense = write_random_model(tmp_path / "dense", "llama", seed=13)
    packer = gptq_act_order_tensors if fmt == "gptq" else compressed_act_order_tensors

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], ActOrdered]:
        rows, cols = weight.shape
        w = act_ordered(random_int4(rows, cols, 32, fmt == "ct", seed=len(module) * 3 + rows), module)
        return packer(w), w

    references = rewrite_checkpoint(dense, tmp_path / fmt, act_order_config(fmt, 32), convert)
    loaded = load_model(tmp_path / fmt, torch.float32, CPU, progress=False)
    linears = _linears(loaded)
    assert linears and all(layer.method is CPU_QUANTIZED for layer in linears.values())
    assert all(store(layer).finish().bits == 8 for layer in linears.values())
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)
    if stack_library() is not None:
        assert_fused_steps_agree(loaded, rows=3)


@pytest.mark.parametrize(
    ("fmt", "model_type"), [("gptq", "llama"), ("gptq", "qwen3_moe"), ("ct", "llama"), ("w8a8", "llama")]
)
def test_an_8_bit_checkpoint_runs_on_the_cpu_kernels_as_8_bit_blocks_of_its_codes(
    tmp_path: Path, fmt: str, model_type: str
) -> None:
    overrides = {"moe_intermediate_size": 64} if model_type == "qwen3_moe" else None
    dense = write_random_model(tmp_path / "dense", model_type, overrides, seed=14)
    packer = {"gptq": gptq8_tensors, "ct": compressed_int8_tensors}.get(fmt, int_quantized_tensors)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Int8Weight]:
        rows, cols = weight.shape
        group = cols if fmt == "w8a8" else 32  # per channel: one group a row
        w = random_int8(rows, cols, group, seed=len(module) * 13 + rows, symmetric=fmt != "gptq")
        return packer(w), w

    references = rewrite_checkpoint(dense, tmp_path / "int8", int8_config(fmt, 32), convert)
    loaded = load_model(tmp_path / "int8", torch.float32, CPU, progress=False)
    _assert_blocks_of_their_codes(loaded, references, bits=8)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert all(m.quantized is not None for m in experts)
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)
    if stack_library() is not None:
        assert_fused_steps_agree(loaded, rows=3)


def test_a_quantized_lm_head_runs_on_the_cpu_kernels_as_its_blocks(tmp_path: Path) -> None:
    dense, model_dir, references = _int4_checkpoint(
        tmp_path, "gptq", overrides={"tie_word_embeddings": False}
    )
    vocab = json.loads((dense / "config.json").read_text())["vocab_size"]
    head = random_int4(vocab, 64, 32, symmetric=False, seed=4)
    replace_lm_head(model_dir, gptq_tensors(head))
    loaded = load_model(model_dir, torch.float32, CPU, progress=False)
    lm_head = loaded.model.get_submodule("lm_head")
    assert isinstance(lm_head, MethodLayer) and lm_head.method is CPU_QUANTIZED
    packed = store(lm_head).finish()
    assert isinstance(packed, QuantizedWeight) and packed.bits == 4
    error = (dequantize_packed(packed)[:vocab] - head.dequantize()).abs()
    assert bool((error <= _bias_rounding(head) * 1.0001).all())
    values = {m: w.dequantize() for m, w in references.items()} | {"lm_head": head.dequantize()}
    twin = dense_twin(dense, tmp_path / "twin", values)
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)
    if stack_library() is not None:
        # With a 4-bit head the two paths measured 1.03e-4 of the largest logit apart here (5.9e-5
        # with the same checkpoint's dense head), over the 1e-4 other cases hold.
        assert_fused_steps_agree(loaded, rows=3, tolerance=3e-4)


def test_int8_on_a_4_bit_checkpoint_takes_its_embedding_and_lm_head(tmp_path: Path) -> None:
    dense, model_dir, references = _int4_checkpoint(
        tmp_path, "gptq", overrides={"tie_word_embeddings": False}
    )
    loaded = load_model(model_dir, torch.float32, CPU, progress=False, quantization="int8")
    layers = {path: m for path, m in loaded.model.named_modules() if isinstance(m, MethodLayer)}
    assert {m.role for m in layers.values()} == {"linear", "embedding", "lm_head"}
    assert all(m.method is CPU_QUANTIZED for m in layers.values())
    for layer in layers.values():  # the checkpoint's 4-bit codes stay 4-bit blocks; the rest Q8_0
        assert store(layer).finish().bits == (4 if layer.role == "linear" else 8)
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)


def test_an_fp8_checkpoint_runs_on_the_cpu_kernels_as_q8_0(tmp_path: Path) -> None:
    dense = write_random_model(tmp_path / "dense", "llama", seed=12)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        parts = fp8_tensors(weight, False, None)
        return parts, parts["weight"].float() * parts["weight_scale"].float().reshape(-1, 1)

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    inputs = {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}
    config = compressed_config(weights, inputs, "float-quantized")
    references = rewrite_checkpoint(dense, tmp_path / "fp8", config, convert)
    loaded = load_model(tmp_path / "fp8", torch.float32, CPU, progress=False)
    linears = _linears(loaded)
    assert linears and all(layer.method is CPU_QUANTIZED for layer in linears.values())
    assert all(store(layer).finish().bits == 8 for layer in linears.values())
    twin = dense_twin(dense, tmp_path / "twin", references)
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), FP8_REQUANTIZED)


def test_a_4_bit_moe_checkpoints_experts_run_on_the_cpu_kernels(tmp_path: Path) -> None:
    # Qwen3-MoE with 64-wide experts (whole blocks of 32).
    overrides = {"moe_intermediate_size": 64}
    dense, model_dir, references = _int4_checkpoint(tmp_path, "gptq", "qwen3_moe", overrides)
    loaded = load_model(model_dir, torch.float32, CPU, progress=False)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.quantized is not None and m.gate_up_proj.numel() == 0 for m in experts)
    assert all(layer.method is CPU_QUANTIZED for layer in _linears(loaded).values())
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), ACTIVATIONS_ROUNDED)
    tokens, _ = greedy_generate(loaded, PROMPTS[0], 4)
    assert len(tokens) == 4


@pytest.mark.parametrize("quantization", ["fp8", "w4a16"])
def test_random_weights_under_quantization_keep_random_dense_experts_on_a_cpu(
    tmp_path: Path, quantization: str
) -> None:
    # A checkpoint's FP8 or 4-bit experts would take the CPU kernels' blocks here, which random weights
    # do not fill: random experts stay dense stacks (as before the kernels took checkpoints' experts).
    path = write_random_model(tmp_path, "qwen3_moe", {"moe_intermediate_size": 64})
    std = json.loads((path / "config.json").read_text())["initializer_range"]
    loaded = load_model(
        path, torch.float32, CPU, random_weights=True, quantization=quantization, progress=False
    )
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.kept is None for m in experts)
    assert all(0.5 < m.gate_up_proj.std().item() / std < 2 for m in experts)


def test_tensor_parallel_ranks_on_the_cpu_kernels_equal_one_rank(tmp_path: Path) -> None:
    # Two ranks: o_proj's 64 and down_proj's 128 inputs split into whole groups (and blocks) of 32.
    _, model_dir, _ = _int4_checkpoint(tmp_path, "gptq")
    single = load_model(model_dir, torch.float32, CPU, progress=False)
    ranks = [load_model(model_dir, torch.float32, CPU, tp=g, progress=False) for g in thread_groups(2)]
    assert all(layer.method is CPU_QUANTIZED for rank in ranks for layer in _linears(rank).values())
    expected, expected_logprobs = greedy_generate(single, PROMPTS[0], 6)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 6), 2):
        assert tokens == expected
        # Each rank's share of a row sums on its own before the ranks' sums meet (2.5e-5 here).
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-4, rtol=0)


@pytest.mark.skipif(stack_library() is None, reason="no AVX2 CPU or C compiler here")
@pytest.mark.parametrize(
    ("fmt", "model_type"), [("gptq", "llama"), ("ct", "llama"), ("awq", "qwen3_moe")], ids=lambda v: v
)
def test_the_fused_decode_stack_steps_a_4_bit_checkpoint_as_the_model_does(
    tmp_path: Path, fmt: str, model_type: str
) -> None:
    # The engine's decode steps on a CPU: asymmetric (per-block biases) and symmetric (one zero point)
    # 4-bit blocks, and quantized experts, through the fused stack against the model's own forward.
    overrides = {"moe_intermediate_size": 64} if model_type == "qwen3_moe" else None
    _, model_dir, _ = _int4_checkpoint(tmp_path, fmt, model_type, overrides)
    assert_fused_steps_agree(load_model(model_dir, torch.float32, CPU, progress=False), rows=3)
