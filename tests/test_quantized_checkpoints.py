"""FP8 and 4-bit safetensors checkpoints (GPTQ, AWQ, compressed-tensors) and --quantization fp8 /
w4a16, on the CPU as on a GPU (the FP8 and W4A16 methods): the loader must rebuild exactly the codes, scales and zero points the checkpoint
holds (checked layer by layer against the values the test packed), and the model's logits must match
a dense model holding the dequantized weights.

Tolerances: 4-bit layers on the CPU multiply the dequantized weight itself, so only float32
summation order differs (1e-4 of the largest logit). FP8 rounds every activation row to e4m3
(3 mantissa bits: up to 1/16 relative per value): against the dequantized twin that moved these
2-layer models' logits by 1.8-3.0% of the largest (three seeds, dynamic and static scales), against
the dense model (weights rounded too) by 3-4%; the tests allow 8% and require the same top token
wherever the reference's top two are further apart than that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from batchlm.layers.moe import FusedMoE
from batchlm.layers.moe_int4 import int4_groups
from batchlm.layers.quantization.dense import DEQUANTIZE
from batchlm.layers.quantization.forms import Int4Weight, Int8Weight
from batchlm.layers.quantization.fp8 import FP8
from batchlm.layers.quantization.int4 import INT4, Int4Store, quantize_int4_groups, store_of
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.int4_formats import act_order, unpack_awq, unpack_compressed_int4, unpack_gptq
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.quantized_checkpoint import read_checkpoint_scheme
from batchlm.models.random_model import write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    greedy_generate,
    run_ranks,
    thread_groups,
)
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
    methods_as_on_a_gpu,
    random_int4,
    random_int8,
    replace_lm_head,
    rewrite_checkpoint,
    shard_references,
    two_prompt_logits,
)

# 64 inputs per group: TINY_CONFIG's 64-wide hidden size is one group, its 128-wide MLP two.
GROUP = 32


@pytest.fixture(autouse=True)
def _methods_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # These tests hold the FP8 and W4A16 methods' loading to the checkpoint's values; on this CPU our
    # quantized kernels would take the layers (test_quantized_checkpoints_cpu.py).
    methods_as_on_a_gpu(monkeypatch)


def _layers(loaded: LoadedModel) -> dict[str, MethodLayer]:
    return {path: m for path, m in loaded.model.named_modules() if isinstance(m, MethodLayer)}


# --- the unpackers alone, on known values -----------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_unpacks_to_the_packed_values(symmetric: bool) -> None:
    w = random_int4(24, 128, GROUP, symmetric, seed=1)
    parts = gptq_tensors(w)
    got = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], GROUP, zeros_minus_one=True)
    assert torch.equal(got.codes, w.codes) and torch.equal(got.zeros, w.zeros)
    assert torch.equal(got.scales, w.scales) and got.group_size == GROUP


def test_gptq_symmetric_zero_words_are_the_known_constant() -> None:
    # Every real symmetric 4-bit GPTQ checkpoint stores zero 8 as 7 in every slot: 0x77777777.
    parts = gptq_tensors(random_int4(16, 64, GROUP, True, seed=2))
    assert bool((parts["qzeros"] == 0x77777777).all())


def test_awq_unpacks_its_interleaved_order() -> None:
    w = random_int4(32, 128, GROUP, symmetric=False, seed=3)
    parts = awq_tensors(w)
    got = unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], GROUP)
    assert torch.equal(got.codes, w.codes) and torch.equal(got.zeros, w.zeros)
    assert torch.equal(got.scales, w.scales)


def test_compressed_tensors_int4_unpacks_to_the_packed_values() -> None:
    w = random_int4(16, 96, GROUP, symmetric=True, seed=4)
    parts = compressed_int4_tensors(w)
    got = unpack_compressed_int4(parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], GROUP)
    assert torch.equal(got.codes, w.codes) and torch.equal(got.zeros, w.zeros) and got.group_size == GROUP
    assert torch.equal(got.dequantize(), w.dequantize())


def _ragged_int4(rows: int, cols: int, group_size: int, symmetric: bool) -> tuple[Int4Weight, torch.Tensor]:
    """A weight whose inputs end in a partial group (a checkpoint stores ceil(cols / g) scales a row),
    and the dense weight it stands for: w[r, c] = (code - zero[c // g]) * scale[c // g]."""
    groups = -(-cols // group_size)
    whole = random_int4(rows, groups * group_size, group_size, symmetric, seed=cols)
    ragged = Int4Weight(whole.codes[:, :cols].contiguous(), whole.scales, whole.zeros, group_size)
    return ragged, whole.dequantize()[:, :cols].contiguous()


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
def test_inputs_ending_in_a_partial_group_unpack_exactly(fmt: str) -> None:
    # SmolLM2's 576-wide layers in GPTQ's groups of 128: five scales a row, the last for 64 inputs.
    ragged, dense = _ragged_int4(16, 576, 128, symmetric=fmt == "ct")
    if fmt == "gptq":
        parts = gptq_tensors(ragged)
        got = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], 128, zeros_minus_one=True)
    elif fmt == "awq":
        parts = awq_tensors(ragged)
        got = unpack_awq(parts["qweight"], parts["qzeros"], parts["scales"], 128)
    else:
        parts = compressed_int4_tensors(ragged)
        got = unpack_compressed_int4(
            parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], 128
        )
    assert got.group_size == 64 and got.scales.shape == (16, 9)
    assert torch.equal(got.dequantize(), dense)


def test_a_partial_group_that_would_need_tiny_groups_is_refused() -> None:
    # 1000 inputs in groups of 128: whole groups covering them would hold 8 inputs.
    ragged, _ = _ragged_int4(16, 1000, 128, symmetric=True)
    parts = compressed_int4_tensors(ragged)
    with pytest.raises(ValueError, match="would hold 8 inputs"):
        unpack_compressed_int4(parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], 128)


def test_a_scale_count_that_does_not_fit_the_groups_is_refused() -> None:
    ragged, _ = _ragged_int4(16, 576, 128, symmetric=True)
    parts = compressed_int4_tensors(ragged)
    with pytest.raises(ValueError, match="576 inputs in groups of 64 needs 9 scales"):
        unpack_compressed_int4(parts["weight_packed"], parts["weight_scale"], parts["weight_shape"], 64)


def test_one_known_word_unpacks_slot_by_slot() -> None:
    # 0x76543210 holds 0..7 in slots 0..7: GPTQ reads them along the inputs, AWQ interleaves outputs.
    word = torch.tensor([[0x76543210]], dtype=torch.int32)
    scales = torch.ones(1, 8, dtype=torch.float16)
    zeros_word = torch.zeros(1, 1, dtype=torch.int32)
    gptq = unpack_gptq(word.t().contiguous(), torch.zeros(1, 1, dtype=torch.int32), scales[:, :1], 8, False)
    assert gptq.codes.flatten().tolist() == list(range(8))
    awq = unpack_awq(torch.tensor([[0x76543210]] * 8, dtype=torch.int32), zeros_word, scales, 8)
    assert awq.codes[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# --- whole checkpoints through the loader ----------------------------------------------------


@dataclass(frozen=True)
class _DenseReference:
    """The values a ragged 4-bit weight stands for (Int4Weight holds whole groups only)."""

    weight: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.weight


def _int4_checkpoint(tmp_path: Path, fmt: str, group: int = GROUP) -> tuple[Path, Path, dict[str, Any]]:
    dense = write_random_model(tmp_path / "dense", "llama", seed=5)
    symmetric = fmt == "ct"
    packer = {"gptq": gptq_tensors, "awq": awq_tensors, "ct": compressed_int4_tensors}[fmt]

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        rows, cols = weight.shape
        if cols % group:
            ragged, values = _ragged_int4(rows, cols, group, symmetric)
            return packer(ragged), _DenseReference(values)
        w = random_int4(rows, cols, group, symmetric, seed=len(module) * 7 + rows)
        return packer(w), w

    configs = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "ct": compressed_config(
            {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
            None,
            "pack-quantized",
        ),
    }
    references = rewrite_checkpoint(dense, tmp_path / fmt, configs[fmt], convert)
    return dense, tmp_path / fmt, references


@pytest.mark.parametrize("fmt", ["gptq", "awq", "ct"])
@pytest.mark.parametrize("group", [GROUP, 48], ids=["whole-groups", "a-partial-last-group"])
def test_int4_checkpoint_loads_exact_weights_and_matching_logits(
    tmp_path: Path, fmt: str, group: int
) -> None:
    dense, quantized_dir, references = _int4_checkpoint(tmp_path, fmt, group)
    loaded = load_model(quantized_dir, torch.float32, CPU, progress=False)
    layers = _layers(loaded)
    for path, layer in layers.items():
        if layer.role != "linear":
            assert layer.method is not INT4
            continue
        assert layer.method is INT4
        expected = torch.cat([w.dequantize() for w in shard_references(references, path)])
        assert torch.equal(INT4.dequantized(layer), expected)
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 1e-4)


# --- act order: groups that are not runs of inputs --------------------------------------------


def _act_order_checkpoint(tmp_path: Path, fmt: str) -> tuple[Path, Path, dict[str, ActOrdered]]:
    dense = write_random_model(tmp_path / "dense", "llama", seed=9)
    packer = {"gptq": gptq_act_order_tensors, "ct": compressed_act_order_tensors}[fmt]

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], ActOrdered]:
        rows, cols = weight.shape
        w = act_ordered(random_int4(rows, cols, GROUP, fmt == "ct", seed=len(module) * 5 + rows), module)
        return packer(w), w

    references = rewrite_checkpoint(dense, tmp_path / fmt, act_order_config(fmt, GROUP), convert)
    return dense, tmp_path / fmt, references


@pytest.mark.parametrize("fmt", ["gptq", "ct"])
def test_an_act_order_checkpoint_gathers_its_inputs_and_matches_its_dense_twin(
    tmp_path: Path, fmt: str
) -> None:
    dense, quantized_dir, references = _act_order_checkpoint(tmp_path, fmt)
    loaded = load_model(quantized_dir, torch.float32, CPU, progress=False)
    linears = {path: m for path, m in _layers(loaded).items() if m.role == "linear"}
    assert linears and all(m.method is INT4 for m in linears.values())
    for path, layer in linears.items():
        parts = shard_references(references, path)
        assert torch.equal(INT4.dequantized(layer), torch.cat([w.dequantize() for w in parts]))
        # Stored so that each group is a run of stored columns.
        order = store_of(layer).input_order
        assert order is not None
        assert torch.equal(parts[0].g_idx()[order].long(), torch.arange(layer.weight_cols) // GROUP)
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 1e-4)


def test_act_order_reads_g_idx_as_runs_of_groups() -> None:
    runs = torch.arange(80) // 32  # the last group holds 16 inputs
    assert act_order(runs, 32, 80) is None  # desc_act with static groups, or one group a row
    assert act_order(torch.zeros(80, dtype=torch.int32), -1, 80) is None
    shuffled = runs[torch.randperm(80, generator=torch.Generator().manual_seed(2))]
    order = act_order(shuffled, 32, 80)
    assert order is not None and torch.equal(shuffled[order], runs)
    uneven = torch.tensor([0] * 40 + [1] * 24 + [2] * 16)[torch.randperm(80)]
    with pytest.raises(ValueError, match="act order needs 32 in each"):
        act_order(uneven, 32, 80)
    with pytest.raises(ValueError, match="80 inputs"):
        act_order(runs[:64], 32, 80)


def test_act_order_weights_split_by_rows_but_not_by_inputs() -> None:
    w = random_int4(16, 64, GROUP, symmetric=False, seed=4)
    ordered = Int4Weight(w.codes, w.scales, w.zeros, GROUP, torch.randperm(64))
    assert ordered.narrow_cols(0, 64) is ordered
    rows = ordered.narrow_rows(4, 8)
    assert rows.input_order is ordered.input_order
    assert torch.equal(rows.dequantize(), ordered.dequantize()[4:12])
    with pytest.raises(ValueError, match="--tensor-parallel-size 1"):
        ordered.narrow_cols(0, 32)


def test_fused_shards_in_different_input_orders_are_refused() -> None:
    store = Int4Store(32, 64, torch.float32, CPU)
    w = random_int4(16, 64, GROUP, symmetric=False, seed=5)
    store.put(0, Int4Weight(w.codes, w.scales, w.zeros, GROUP, torch.randperm(64)))
    with pytest.raises(ValueError, match="different input orders"):
        store.put(16, Int4Weight(w.codes, w.scales, w.zeros, GROUP, torch.randperm(64).flip(0)))
    with pytest.raises(ValueError, match="different input orders"):
        store.put(16, w)


def test_act_order_experts_are_refused_on_the_gpu_stacks() -> None:
    w = random_int4(16, 64, GROUP, symmetric=False, seed=6)
    with pytest.raises(ValueError, match="act-order 4-bit experts"):
        int4_groups(Int4Weight(w.codes, w.scales, w.zeros, GROUP, torch.randperm(64)))


@pytest.mark.parametrize(
    ("actorder", "act_order_read"), [("group", True), ("dynamic", True), ("weight", False), ("static", False)]
)
def test_compressed_tensors_actorder_values(tmp_path: Path, actorder: str, act_order_read: bool) -> None:
    # "weight" / "static": the order only guided the quantizer; groups stay runs of inputs (no g_idx).
    config = act_order_config("ct", GROUP)
    config["config_groups"]["group_0"]["weights"]["actorder"] = actorder
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    scheme = read_checkpoint_scheme(tmp_path)
    assert scheme is not None and scheme.act_order is act_order_read
    config["config_groups"]["group_0"]["weights"]["actorder"] = "sideways"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    with pytest.raises(ValueError, match="actorder 'sideways'"):
        read_checkpoint_scheme(tmp_path)


# --- GPTQ's 8-bit checkpoints ------------------------------------------------------------------


def test_gptq_8_bit_words_unpack_to_their_codes_and_zeros() -> None:
    w = random_int8(24, 128, GROUP, seed=7)
    parts = gptq8_tensors(w)
    got = unpack_gptq(parts["qweight"], parts["qzeros"], parts["scales"], GROUP, True, bits=8)
    assert isinstance(got, Int8Weight)
    assert torch.equal(got.codes, w.codes) and torch.equal(got.zeros, w.zeros)  # zeros up to 256
    assert int(got.zeros.max()) <= 256 and torch.equal(got.scales, w.scales)
    assert torch.equal(got.dequantize(), w.dequantize())


@pytest.mark.parametrize("fmt", ["gptq", "ct", "w8a16", "w8a8"])
def test_an_8_bit_checkpoint_loads_dequantized_off_the_cpu_kernels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fmt: str
) -> None:
    dense = write_random_model(tmp_path / "dense", "llama", seed=10)
    packer = {"gptq": gptq8_tensors, "ct": compressed_int8_tensors}.get(fmt, int_quantized_tensors)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Int8Weight]:
        rows, cols = weight.shape
        group = cols if fmt == "w8a8" else GROUP  # per channel: one group a row
        w = random_int8(rows, cols, group, seed=len(module) * 11 + rows, symmetric=fmt != "gptq")
        return packer(w), w

    references = rewrite_checkpoint(dense, tmp_path / "int8", int8_config(fmt, GROUP), convert)
    with caplog.at_level(logging.WARNING, logger="batchlm.models.loader"):
        loaded = load_model(tmp_path / "int8", torch.float32, CPU, progress=False)
    kind = {"gptq": "gptq", "ct": "compressed-tensors pack-quantized"}.get(
        fmt, "compressed-tensors int-quantized"
    )
    assert f"8-bit {kind} checkpoint on cpu: no kernel of ours reads 8-bit groups there" in caplog.text
    linears = {path: m for path, m in _layers(loaded).items() if m.role == "linear"}
    assert linears and all(m.method is DEQUANTIZE for m in linears.values())
    for path, layer in linears.items():
        expected = torch.cat([w.dequantize() for w in shard_references(references, path)])
        assert torch.equal(layer.weight, expected), path
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 1e-5)


def test_a_quantized_lm_head_takes_the_checkpoints_method(tmp_path: Path) -> None:
    # GPTQ's lm_head option: the head is 4-bit too, while a dense head stays dense under --quantization.
    dense = write_random_model(tmp_path / "dense", "llama", {"tie_word_embeddings": False}, seed=15)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Int4Weight]:
        rows, cols = weight.shape
        w = random_int4(rows, cols, GROUP, symmetric=False, seed=len(module) * 19 + rows)
        return gptq_tensors(w), w

    config = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "lm_head": True}
    references = rewrite_checkpoint(dense, tmp_path / "gptq", config, convert)
    head_rows, head_cols = json.loads((dense / "config.json").read_text())["vocab_size"], 64
    head = random_int4(head_rows, head_cols, GROUP, symmetric=False, seed=3)
    replace_lm_head(tmp_path / "gptq", gptq_tensors(head))
    loaded = load_model(tmp_path / "gptq", torch.float32, CPU, progress=False)
    lm_head = loaded.model.get_submodule("lm_head")
    assert isinstance(lm_head, MethodLayer) and lm_head.method is INT4
    assert torch.equal(INT4.dequantized(lm_head)[:head_rows], head.dequantize())
    values = {m: w.dequantize() for m, w in references.items()} | {"lm_head": head.dequantize()}
    twin = dense_twin(dense, tmp_path / "twin", values)
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 1e-4)
    plain = load_model(dense, torch.float32, CPU, progress=False, quantization="w4a16")
    assert plain.model.get_submodule("lm_head").method is not INT4


def test_8_bit_experts_load_as_dense_stacks_off_the_cpu_kernels(tmp_path: Path) -> None:
    dense = write_random_model(tmp_path / "dense", "qwen3_moe", {"moe_intermediate_size": 64}, seed=12)

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Int8Weight]:
        rows, cols = weight.shape
        w = random_int8(rows, cols, GROUP, seed=len(module) * 17 + rows)
        return gptq8_tensors(w), w

    references = rewrite_checkpoint(dense, tmp_path / "int8", int8_config("gptq", GROUP), convert)
    loaded = load_model(tmp_path / "int8", torch.float32, CPU, progress=False)
    first = loaded.model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(first, FusedMoE) and first.kept is None
    for expert in (0, 3):
        prefix = f"model.layers.0.mlp.experts.{expert}"
        gate_up = torch.cat([references[f"{prefix}.{p}"].dequantize() for p in ("gate_proj", "up_proj")])
        assert torch.equal(first.gate_up_proj[expert], gate_up)
        assert torch.equal(first.down_proj[expert], references[f"{prefix}.down_proj"].dequantize())
    twin = dense_twin(dense, tmp_path / "twin", {m: w.dequantize() for m, w in references.items()})
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 1e-5)


@pytest.mark.parametrize(("per_tensor", "static"), [(False, False), (True, True)])
def test_fp8_checkpoint_matches_its_dequantized_twin(tmp_path: Path, per_tensor: bool, static: bool) -> None:
    dense = write_random_model(tmp_path / "dense", "llama", seed=6)
    input_scale = 0.02 if static else None

    def convert(module: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        parts = fp8_tensors(weight, per_tensor, input_scale)
        return parts, parts["weight"].float() * parts["weight_scale"].float().reshape(-1, 1)

    weights = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor" if per_tensor else "channel",
    }
    inputs = {
        "num_bits": 8,
        "type": "float",
        "dynamic": not static,
        "strategy": "tensor" if static else "token",
    }
    references = rewrite_checkpoint(
        dense, tmp_path / "fp8", compressed_config(weights, inputs, "float-quantized"), convert
    )
    loaded = load_model(tmp_path / "fp8", torch.float32, CPU, progress=False)
    linears = [m for m in _layers(loaded).values() if m.role == "linear"]
    assert linears and all(m.method is FP8 for m in linears)
    attn = loaded.model.get_submodule("model.layers.0.self_attn.qkv_proj")
    expected = torch.cat(
        [references[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")]
    )
    assert torch.equal(FP8.dequantized(attn), expected)
    if static:
        assert float(attn.__dict__["fp8_input_scale"]) == pytest.approx(0.02)
    twin = dense_twin(dense, tmp_path / "twin", references)
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), 0.08)


@pytest.mark.parametrize("quantization", ["fp8", "w4a16"])
def test_quantization_at_load_stays_close_to_the_dense_model(tmp_path: Path, quantization: str) -> None:
    model_dir = write_random_model(tmp_path, "llama", seed=7)
    dense = load_model(model_dir, torch.float32, CPU, progress=False)
    quantized = load_model(model_dir, torch.float32, CPU, progress=False, quantization=quantization)
    method = FP8 if quantization == "fp8" else INT4
    linears = [m for m in _layers(quantized).values() if m.role == "linear"]
    assert linears and all(m.method is method for m in linears)
    # Measured on four seeds: fp8 moves these logits by 3-4% of the largest, 4-bit RTN by 11.5-12%.
    assert_logits_close(
        two_prompt_logits(quantized), two_prompt_logits(dense), 0.08 if quantization == "fp8" else 0.2
    )


def test_rtn_int4_is_symmetric_and_within_half_a_step() -> None:
    weight = torch.randn(8, 64)
    w = quantize_int4_groups(weight, 32)
    assert bool((w.zeros == 8).all()) and int(w.codes.max()) <= 15
    step = w.scales.float().repeat_interleave(32, dim=1)
    assert bool(((w.dequantize() - weight).abs() <= step / 2 + 1e-6).all())


def test_random_weights_take_the_quantized_methods(tmp_path: Path) -> None:
    model_dir = write_random_model(tmp_path, "llama", seed=8)
    loaded = load_model(
        model_dir, torch.float32, CPU, random_weights=True, quantization="w4a16", progress=False
    )
    assert {m.method for m in _layers(loaded).values() if m.role == "linear"} == {INT4}
    assert torch.isfinite(two_prompt_logits(loaded)).all()


# --- what is refused, and how ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"quant_method": "gptq", "bits": 3}, "3-bit"),
        ({"quant_method": "gptq", "bits": 2}, "2-bit"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
        ({"quant_method": "bitsandbytes"}, "bitsandbytes"),
        (
            compressed_config(
                {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": False},
                None,
                "int-quantized",
            ),
            "int8 channel",
        ),
        (
            compressed_config(
                {"num_bits": 8, "type": "int", "strategy": "channel"},
                {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False},
                "int-quantized",
            ),
            "int8 tensor static",
        ),
        (
            compressed_config(
                {"num_bits": 8, "type": "float", "strategy": "block"},
                {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "group"},
                "float-quantized",
            ),
            "block",
        ),
    ],
)
def test_unsupported_schemes_fail_naming_them(tmp_path: Path, config: dict[str, Any], named: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    with pytest.raises(ValueError, match=named):
        read_checkpoint_scheme(tmp_path)


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    _, quantized_dir, _ = _int4_checkpoint(tmp_path, "gptq")
    with pytest.raises(ValueError, match="already quantized"):
        load_model(quantized_dir, torch.float32, CPU, progress=False, quantization="fp8")


def test_missing_parts_are_named(tmp_path: Path) -> None:
    _, quantized_dir, _ = _int4_checkpoint(tmp_path, "awq")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(quantized_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.qzeros"]
    save_file(tensors, str(quantized_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj.*qzeros"):
        load_model(quantized_dir, torch.float32, CPU, progress=False)


# --- slicing, as fused shards and tensor-parallel splits do -----------------------------------


def test_int4_slices_match_the_dequantized_slices() -> None:
    w = random_int4(16, 128, GROUP, symmetric=False, seed=9)
    full = w.dequantize()
    assert torch.equal(w.narrow_rows(4, 8).dequantize(), full[4:12])
    assert torch.equal(w.narrow_cols(64, 64).dequantize(), full[:, 64:])
    with pytest.raises(ValueError, match="group edges"):
        w.narrow_cols(16, 64)


def test_fp8_slices_keep_their_row_scales() -> None:
    from batchlm.layers.quantization.forms import quantize_fp8_rows

    w = quantize_fp8_rows(torch.randn(12, 64))
    full = w.dequantize()
    assert torch.equal(w.narrow_rows(3, 5).dequantize(), full[3:8])
    assert torch.equal(w.narrow_cols(16, 32).dequantize(), full[:, 16:48])


def test_tensor_parallel_ranks_equal_one_rank(tmp_path: Path) -> None:
    # Two ranks: o_proj's 64 and down_proj's 128 inputs split into whole groups of 32.
    _, quantized_dir, _ = _int4_checkpoint(tmp_path, "gptq")
    single = load_model(quantized_dir, torch.float32, CPU, progress=False)
    ranks = [load_model(quantized_dir, torch.float32, CPU, tp=g, progress=False) for g in thread_groups(2)]
    expected, expected_logprobs = greedy_generate(single, PROMPTS[0], 6)
    for tokens, logprobs in run_ranks(lambda rank: greedy_generate(ranks[rank], PROMPTS[0], 6), 2):
        assert tokens == expected
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-4, rtol=0)


def test_quantizing_a_gguf_file_at_load_is_refused(tmp_path: Path) -> None:
    from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
    from gguf_builder import write_tiny_gguf

    model_dir = prepare_gguf_model_dir(
        write_tiny_gguf(tmp_path / "t.gguf", "llama", "Q8_0", False), tmp_path / "c"
    )
    with pytest.raises(ValueError, match="not GGUF files"):
        load_model(model_dir, torch.float32, CPU, progress=False, quantization="w4a16")
