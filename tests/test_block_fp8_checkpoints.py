"""Block-wise FP8 checkpoints (transformers' fine-grained FP8: `weight` in e4m3 and `weight_scale_inv`,
one float32 scale per block of rows x inputs), on the CPU: each weight is dequantized as it loads and
runs as a dense checkpoint's would (dense float32 on GPUs without FP8 tensor cores and on CPUs without
our quantized kernels, `methods_as_on_a_gpu` here; per-channel FP8 W8A8 on GPUs with FP8 tensor cores,
as under --quantization fp8; Q8_0 blocks on x86-64 CPUs with our kernels, as under --quantization
int8).

The test quantizes a tiny random model block by block itself (tests/quant_checkpoints.py), with small
blocks so each layer has several, and partial ones where a size is not a multiple of the block. The
loaded weights must equal the values the codes and scales stand for exactly; the logits must match
transformers loading the same checkpoint (it dequantizes FP8 on a CPU; fp32 both, so only summation
order differs) or, where its CPU path cannot read partial blocks (it takes the block size from the
scale grid), a dense model holding the dequantized weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, CPU_QUANTIZED_4BIT
from batchlm.layers.quantization.dense import DENSE
from batchlm.layers.quantization.forms import quantize_fp8_rows
from batchlm.layers.quantization.fp8 import FP8
from batchlm.layers.quantization.int4 import INT4
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.layers.quantization.registry import (
    BLOCK_FP8_QTYPE,
    DENSE_FORMAT,
    FP8_QTYPE,
    WeightSpec,
    choose_linear_method,
    int8_available,
)
from batchlm.models import fp8_formats
from batchlm.models.fp8_formats import dequantize_fp8_blocks
from batchlm.models.loader import LoadedModel, load_model
from batchlm.models.quantized_checkpoint import read_checkpoint_scheme
from batchlm.models.random_model import write_random_model
from models_harness import (
    CPU,
    PROMPTS,
    assert_greedy_matches_hf,
)
from quant_checkpoints import (
    assert_logits_close,
    block_fp8_config,
    block_fp8_tensors,
    dense_twin,
    methods_as_on_a_gpu,
    rewrite_checkpoint,
    shard_references,
    two_prompt_logits,
)

# Whole blocks over TINY_CONFIG's 32-, 64- and 128-wide sizes (2 to 8 blocks a layer).
WHOLE = (32, 32)
# Partial last blocks everywhere: 64 rows = 48 + 16, 32 rows = one partial block, 128 inputs = 3 x 40 + 8.
RAGGED = (48, 40)
# Q8_0 rounds each 32 weights again and each 32 activations to int8 (test_cpu_quantized_model.py
# allows dense checkpoints quantized at load the same 3% of the largest logit).
REQUANTIZED = 0.03


def _block_fp8_checkpoint(
    tmp_path: Path, block: tuple[int, int], model_type: str = "llama", overrides: dict[str, Any] | None = None
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A random dense model, and the same model as a block-wise FP8 checkpoint; returns both directories
    and, per quantized module, the float32 weight its codes and scales stand for."""
    dense = write_random_model(tmp_path / "dense", model_type, overrides, seed=11)
    references = rewrite_checkpoint(
        dense, tmp_path / "fp8", block_fp8_config(block), lambda _, weight: block_fp8_tensors(weight, block)
    )
    return dense, tmp_path / "fp8", references


def _load(model_dir: Path, quantization: str | None = None) -> LoadedModel:
    return load_model(model_dir, torch.float32, CPU, progress=False, quantization=quantization)


def _linears(loaded: LoadedModel) -> dict[str, MethodLayer]:
    return {
        path: m
        for path, m in loaded.model.named_modules()
        if isinstance(m, MethodLayer) and m.role == "linear"
    }


def _expected_weight(path: str, references: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's weight from its checkpoint modules' references (fused shards one after another)."""
    return torch.cat(shard_references(references, path))


# --- dequantizing one weight ------------------------------------------------------------------


def test_each_block_takes_its_own_scale_partial_blocks_included() -> None:
    # Codes all 1.0, so each value is its block's scale: 5 x 3 blocks of 4 x 8 over a [18, 20] weight.
    scales = torch.arange(1, 16, dtype=torch.float32).reshape(5, 3)
    weight = torch.ones(18, 20).to(torch.float8_e4m3fn)
    got = dequantize_fp8_blocks(weight, scales, (4, 8), torch.float32)
    assert got[0, 0] == 1 and got[0, 8] == 2 and got[0, 19] == 3 and got[4, 0] == 4
    assert got[17, 0] == 13 and got[17, 16] == 15 and got[3, 7] == 1 and got[16, 15] == 14
    expected = scales.repeat_interleave(4, 0)[:18].repeat_interleave(8, 1)[:, :20]
    assert torch.equal(got, expected)


@pytest.mark.parametrize("block", [WHOLE, RAGGED, (16, 128)], ids=["whole", "partial", "wide"])
def test_dequantized_weight_is_codes_times_block_scales(block: tuple[int, int]) -> None:
    weight = torch.randn(72, 104) * torch.linspace(0.1, 3.0, 104)  # blocks of different magnitudes
    parts, values = block_fp8_tensors(weight, block)
    got = dequantize_fp8_blocks(parts["weight"], parts["weight_scale_inv"], block, torch.float32)
    assert torch.equal(got, values)
    as_bf16 = dequantize_fp8_blocks(parts["weight"], parts["weight_scale_inv"], block, torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, values.to(torch.bfloat16))


@pytest.mark.parametrize("step_values", [1, 3 * 48 * 104], ids=["one-block-row", "three-block-rows"])
def test_dequantizing_in_steps_gives_the_same_values(
    monkeypatch: pytest.MonkeyPatch, step_values: int
) -> None:
    # 200 rows: four whole blocks of 48 and a partial one of 8, split over several steps.
    monkeypatch.setattr(fp8_formats, "STEP_VALUES", step_values)
    parts, values = block_fp8_tensors(torch.randn(200, 104), RAGGED)
    got = dequantize_fp8_blocks(parts["weight"], parts["weight_scale_inv"], RAGGED, torch.float32)
    assert torch.equal(got, values)


def test_a_scale_grid_of_another_shape_is_refused() -> None:
    parts, _ = block_fp8_tensors(torch.randn(64, 88), RAGGED)
    with pytest.raises(ValueError, match=r"shape \[2, 2\].*needs \[2, 3\]"):
        dequantize_fp8_blocks(parts["weight"], parts["weight_scale_inv"][:, :2], RAGGED, torch.float32)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8_blocks(torch.randn(64, 88), parts["weight_scale_inv"], RAGGED, torch.float32)
    ue8m0 = parts["weight_scale_inv"].to(torch.uint8)
    with pytest.raises(ValueError, match="must be floats"):
        dequantize_fp8_blocks(parts["weight"], ue8m0, RAGGED, torch.float32)


# --- which method a layer takes ---------------------------------------------------------------


def _method_for(device: str, quantization: str | None = None) -> object:
    spec = WeightSpec(
        DENSE_FORMAT, (BLOCK_FP8_QTYPE,) * 3, "linear", torch.device(device), torch.bfloat16, quantization
    )
    return choose_linear_method(spec)


@pytest.mark.parametrize(
    ("capability", "method"), [((9, 0), FP8), ((8, 9), FP8), ((8, 0), DENSE)], ids=["hopper", "ada", "ampere"]
)
def test_a_gpu_with_fp8_tensor_cores_runs_them_as_per_channel_fp8(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], method: object
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert _method_for("cuda:0") is method
    assert _method_for("cuda:0", "w4a16") is INT4  # dense weights' --quantization applies


def test_a_cpu_runs_them_as_q8_0_or_dense_without_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _method_for("cpu") is (CPU_QUANTIZED if int8_available() else DENSE)
    if int8_available():
        # Dense as they load, so --quantization applies: fp8 as Q8_0, w4a16 as 4-bit blocks.
        assert _method_for("cpu", "fp8") is CPU_QUANTIZED
        assert _method_for("cpu", "w4a16") is CPU_QUANTIZED_4BIT
        assert _method_for("cpu", "int8") is CPU_QUANTIZED
    monkeypatch.setattr(registry, "kernels_available", lambda: False)
    assert _method_for("cpu") is DENSE
    assert _method_for("cpu", "fp8") is FP8
    # A checkpoint whose FP8 weights keep their own (per-channel) scales refuses --quantization off the
    # kernels (on them, int8 takes its dense layers: test_quantized_checkpoints_cpu.py).
    with pytest.raises(ValueError, match="already quantized"):
        choose_linear_method(WeightSpec(DENSE_FORMAT, (FP8_QTYPE,), "linear", CPU, torch.float32, "int8"))


# --- whole checkpoints through the loader ------------------------------------------------------


def test_checkpoint_matches_transformers_loading_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    methods_as_on_a_gpu(monkeypatch)  # dense float32, as without our CPU kernels
    _, model_dir, references = _block_fp8_checkpoint(tmp_path, WHOLE)
    assert read_checkpoint_scheme(model_dir) is not None
    with caplog.at_level(logging.INFO, logger="batchlm.models.loader"):
        loaded = _load(model_dir)
    assert "block-wise FP8 checkpoint: weights dequantized at load and run as dense float32 on the CPU" in (
        caplog.text
    )
    linears = _linears(loaded)
    assert linears and all(layer.method is DENSE for layer in linears.values())
    for path, layer in linears.items():
        assert torch.equal(layer.weight, _expected_weight(path, references)), path
    # transformers dequantizes FP8 checkpoints as it loads them on a machine without a GPU.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert_greedy_matches_hf(loaded, hf, PROMPTS, 12)


def test_partial_blocks_load_the_values_they_stand_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods_as_on_a_gpu(monkeypatch)
    dense, model_dir, references = _block_fp8_checkpoint(tmp_path, RAGGED)
    loaded = _load(model_dir)
    for path, layer in _linears(loaded).items():
        assert torch.equal(layer.weight, _expected_weight(path, references)), path
    twin = dense_twin(dense, tmp_path / "twin", references)
    torch.testing.assert_close(two_prompt_logits(loaded), two_prompt_logits(twin), atol=1e-5, rtol=0)


def test_moe_experts_load_dequantized_as_dense_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods_as_on_a_gpu(monkeypatch)
    # Experts of 48 intermediate rows: one whole block of 32 and a partial one of 16.
    dense, model_dir, references = _block_fp8_checkpoint(tmp_path, WHOLE, "qwen3_moe")
    loaded = _load(model_dir)
    experts = [m for m in loaded.model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.quantized is None for m in experts)
    first = loaded.model.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(first, FusedMoE)
    for expert in (0, 5):
        prefix = f"model.layers.0.mlp.experts.{expert}"
        gate_up = torch.cat([references[f"{prefix}.gate_proj"], references[f"{prefix}.up_proj"]])
        assert torch.equal(first.gate_up_proj[expert], gate_up)
        assert torch.equal(first.down_proj[expert], references[f"{prefix}.down_proj"])
    twin = dense_twin(dense, tmp_path / "twin", references)
    torch.testing.assert_close(two_prompt_logits(loaded), two_prompt_logits(twin), atol=1e-5, rtol=0)


def test_quantization_fp8_requantizes_each_row_as_for_a_dense_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The path a Hopper/Ada GPU takes unasked: dense rows to one FP8 scale each.
    methods_as_on_a_gpu(monkeypatch)
    _, model_dir, references = _block_fp8_checkpoint(tmp_path, RAGGED)
    loaded = _load(model_dir, "fp8")
    linears = _linears(loaded)
    assert linears and all(layer.method is FP8 for layer in linears.values())
    for path, layer in linears.items():
        rows = [quantize_fp8_rows(weight) for weight in shard_references(references, path)]
        assert torch.equal(FP8.dequantized(layer), torch.cat([r.dequantize() for r in rows])), path


@pytest.mark.skipif(not int8_available(), reason="the quantized CPU kernels are unavailable here")
@pytest.mark.parametrize("quantization", [None, "int8"])
@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_the_cpu_kernels_run_them_as_q8_0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, model_type: str, quantization: str | None
) -> None:
    # The experts too, where their sizes are whole blocks of 32 (64 intermediate rows); under
    # --quantization int8 the embedding and LM head as well.
    overrides = {"moe_intermediate_size": 64} if model_type == "qwen3_moe" else None
    dense, model_dir, references = _block_fp8_checkpoint(tmp_path, WHOLE, model_type, overrides)
    with caplog.at_level(logging.INFO, logger="batchlm.models.loader"):
        loaded = _load(model_dir, quantization)
    assert "weights dequantized at load and run as Q8_0 blocks on the CPU" in caplog.text
    layers = [m for m in loaded.model.modules() if isinstance(m, MethodLayer)]
    linears = [m for m in layers if quantization or m.role == "linear"]
    assert linears and all(m.method is CPU_QUANTIZED for m in linears)
    assert all(m.quantized is not None for m in loaded.model.modules() if isinstance(m, FusedMoE))
    twin = dense_twin(dense, tmp_path / "twin", references)
    assert_logits_close(two_prompt_logits(loaded), two_prompt_logits(twin), REQUANTIZED)


# --- what is refused, and how ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"weight_block_size": None}, "weight_block_size None"),
        ({"weight_block_size": [128]}, r"weight_block_size \[128\]"),
        ({"weight_block_size": [1, 128, 128]}, r"weight_block_size \[1, 128, 128\]"),
        ({"weight_block_size": [0, 128]}, r"weight_block_size \[0, 128\]"),
        ({"scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
        ({"expert_dtype": "fp4"}, "expert_dtype 'fp4'"),
    ],
)
def test_unsupported_variants_fail_naming_them(tmp_path: Path, changes: dict[str, Any], named: str) -> None:
    config = {**block_fp8_config((128, 128)), **changes}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    with pytest.raises(ValueError, match=f"block-wise FP8.*{named}"):
        read_checkpoint_scheme(tmp_path)


def test_a_missing_block_size_means_transformers_default(tmp_path: Path) -> None:
    config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    scheme = read_checkpoint_scheme(tmp_path)
    assert scheme is not None and scheme.block == (128, 128)


def _without(model_dir: Path, name: str) -> None:
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(model_dir / "model.safetensors"))


def test_a_weight_without_its_scale_is_named(tmp_path: Path) -> None:
    _, model_dir, _ = _block_fp8_checkpoint(tmp_path, WHOLE)
    _without(model_dir, "model.layers.1.mlp.down_proj.weight_scale_inv")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' is FP8.*weight_scale_inv"):
        _load(model_dir)


def test_a_scale_without_its_weight_is_named(tmp_path: Path) -> None:
    _, model_dir, _ = _block_fp8_checkpoint(tmp_path, WHOLE)
    _without(model_dir, "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match=r"k_proj' lacks \['weight'\]"):
        _load(model_dir)


def test_a_checkpoint_written_with_another_block_is_named(tmp_path: Path) -> None:
    _, model_dir, _ = _block_fp8_checkpoint(tmp_path, WHOLE)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight 'model\.layers\.0\.[\w.]+': .*in blocks of 64x64 needs"):
        _load(model_dir)
