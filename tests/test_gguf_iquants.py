"""GGUF files of llama.cpp's i-quant (IQ*) and ternary (TQ*) types, as random blocks with sane float16
scales (gguf_builder.random_blocks): each loads with the values of the gguf package's reference
dequantization, exactly on the dense path (against the same file written as F32) and within Q8_0's
rounding on the quantized CPU path (IQ4_NL and IQ4_XS as 8-bit codes of their levels: exactly, bar
IQ4_XS's float16 sub-block scales)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from batchlm.kernels import quant_blocks
from batchlm.kernels.cpu_quant import quant_library
from batchlm.kernels.quant_panels import dequantize_packed
from batchlm.layers.quantization import registry
from batchlm.layers.quantization.base import QuantizedTensor, columns_of
from batchlm.layers.quantization.cpu_quantized import CPU_QUANTIZED, code_blocks, store
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.models.gguf_file import iter_gguf_tensors, open_gguf, weight_tensors
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.gguf_progress import stored_bytes, with_progress
from batchlm.models.gguf_types import FLOAT_TYPES, KERNEL_TYPES, REFERENCE_TYPES, SUPPORTED_TYPES
from batchlm.models.loader import LoadedModel, load_model
from gguf_builder import random_blocks, write_dequantized_copy, write_tiny_gguf
from models_harness import Chunk, greedy_generate, make_kv_caches, run_step

CPU = torch.device("cpu")
PROMPT = [5, 17, 42, 99, 3, 250, 7]
I_QUANTS = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"]
TERNARY = ["TQ1_0", "TQ2_0"]
QWEN3_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256}
# Logits of the quantized CPU path against the dense model of the same values, as a fraction of the
# largest (test_cpu_quantized_model.py explains both): the file's values, or requantized to Q8_0.
EXACT_WEIGHTS = 3e-3
REQUANTIZED_WEIGHTS = 0.03
needs_kernels = pytest.mark.skipif(quant_library() is None, reason="no AVX2 CPU or C compiler here")


def _load(gguf_path: Path, cache: Path) -> LoadedModel:
    return load_model(prepare_gguf_model_dir(gguf_path, cache), torch.float32, CPU, progress=False)


def _without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "kernels_available", lambda: False)


def _methods(loaded: LoadedModel) -> set[str]:
    return {type(m.method).__name__ for m in loaded.model.modules() if isinstance(m, MethodLayer)}


def _file_values(gguf_path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in open_gguf(gguf_path).tensors if t.name == name)
    return dequantize(np.asarray(tensor.data), tensor.tensor_type)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    chunks = [Chunk(PROMPT, 0, [0, 1]), Chunk([11] * 3 + list(range(100, 121)), 0, [2, 3, 4, 5, 6, 7])]
    return run_step(loaded.model, make_kv_caches(loaded, 16), chunks)


def test_one_list_says_how_each_type_loads() -> None:
    assert set(quant_blocks.GGUF_BLOCK_BYTES) | {"Q6_K"} == KERNEL_TYPES
    # Of the K-quants only Q2_K (rare) still dequantizes through the reference code.
    assert {"Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= KERNEL_TYPES
    assert {qtype for qtype in REFERENCE_TYPES if qtype.endswith("_K")} == {"Q2_K"}
    assert not KERNEL_TYPES & REFERENCE_TYPES and not FLOAT_TYPES & (KERNEL_TYPES | REFERENCE_TYPES)
    assert set(I_QUANTS + TERNARY) <= SUPPORTED_TYPES
    assert registry.FLOAT_QTYPES == FLOAT_TYPES  # its copy below the models layer


@pytest.mark.parametrize("qtype", I_QUANTS + TERNARY)
def test_the_gguf_package_dequantizes_each_type(qtype: str) -> None:
    # What both paths rest on: finite values of the expected spread from random blocks of the type.
    values = dequantize(
        random_blocks((64, 512), qtype, np.random.default_rng(0)), GGMLQuantizationType[qtype]
    )
    assert values.shape == (64, 512) and np.isfinite(values).all()
    assert 0.02 < values.std() < 0.1


@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS"])
def test_iq4_code_blocks_hold_the_file_values(qtype: str) -> None:
    rows, cols = 48, 1024
    raw = random_blocks((rows, cols), qtype, np.random.default_rng(1))
    reference = dequantize(raw, GGMLQuantizationType[qtype])
    blocks = quant_blocks.from_gguf(qtype, raw, rows, cols)
    assert blocks.bits == 8
    ours = quant_blocks.dequantize(blocks)
    if qtype == "IQ4_NL":
        assert np.array_equal(ours, reference)
    else:  # each sub-block scale d * (ls - 32) rounded to float16: a relative error <= 2^-11
        assert np.all(np.abs(ours - reference) <= 2.0**-11 * np.abs(reference))
    # A tensor-parallel share inside IQ4_XS's 256-value blocks reads the same values as the whole.
    block_size, block_bytes = quant_blocks.GGUF_BLOCK_SIZE[qtype], quant_blocks.GGUF_BLOCK_BYTES[qtype]
    whole = QuantizedTensor(qtype, torch.from_numpy(raw), cols, block_size, block_bytes)
    share = code_blocks(columns_of(whole, 160, 128))
    assert np.array_equal(quant_blocks.dequantize(share), ours[:, 160:288])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("qtype", "tied"),
    [(qtype, index % 2 == 0) for index, qtype in enumerate(I_QUANTS + TERNARY)],
)
def test_dense_path_reads_the_reference_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, tied: bool
) -> None:
    # Tied: the token embedding (and so the LM head) in the type too.
    _without_kernels(monkeypatch)
    quantized_path = write_tiny_gguf(tmp_path / "q" / "tiny.gguf", "llama", qtype, tied, seed=1)
    float_path = write_dequantized_copy(quantized_path, tmp_path / "f.gguf")
    ours, reference = _load(quantized_path, tmp_path / "c"), _load(float_path, tmp_path / "c")
    assert _methods(ours) == {"DequantizeLinearMethod"}
    embedding = ours.model.model.embed_tokens.weight
    assert torch.equal(embedding, torch.from_numpy(_file_values(quantized_path, "token_embd.weight")))
    tokens, logprobs = greedy_generate(ours, PROMPT, 8)
    expected, expected_logprobs = greedy_generate(reference, PROMPT, 8)
    assert tokens == expected
    assert torch.equal(logprobs, expected_logprobs)
    # The derived model directory does not depend on the tensors' types (no new cache version).
    derived = [prepare_gguf_model_dir(path, tmp_path / "c") for path in (quantized_path, float_path)]
    assert len({(d / "config.json").read_text() for d in derived}) == 1


def _assert_holds_the_values(held: np.ndarray, values: np.ndarray, qtype: str) -> None:
    """The quantized CPU path's weight: the file's values (IQ4s, their float16 sub-block scales
    aside), else their Q8_0 requantization."""
    if qtype == "IQ4_NL":
        assert np.array_equal(held, values)
    elif qtype == "IQ4_XS":
        assert np.all(np.abs(held - values) <= 2.0**-11 * np.abs(values))
    else:
        step = np.abs(values.reshape(values.shape[0], -1, 32)).max(axis=-1, keepdims=True) / 127
        error = np.abs(held - values).reshape(step.shape[0], -1, 32)
        # Half a step, and the step's rounding to float16 (subnormal for small blocks) times up to 127.
        rounding = np.abs(step.astype(np.float16).astype(np.float32) - step)
        assert np.all(error <= step * (0.5 + 1e-6) + 127 * rounding)


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize(
    ("qtype", "tied"), [(qtype, index % 2 == 1) for index, qtype in enumerate(I_QUANTS + TERNARY)]
)
def test_quantized_cpu_path_is_within_q8_of_the_reference_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qtype: str, tied: bool
) -> None:
    quantized_path = write_tiny_gguf(tmp_path / "q" / "tiny.gguf", "llama", qtype, tied, seed=1)
    ours = _load(quantized_path, tmp_path / "c")
    assert _methods(ours) == {"CpuQuantizedLinearMethod"}
    embedding = ours.model.model.embed_tokens
    assert embedding.method is CPU_QUANTIZED
    held = dequantize_packed(store(embedding).finish_whole()).numpy()
    _assert_holds_the_values(held, _file_values(quantized_path, "token_embd.weight"), qtype)
    _without_kernels(monkeypatch)
    reference = _load(write_dequantized_copy(quantized_path, tmp_path / "f.gguf"), tmp_path / "c")
    fraction = EXACT_WEIGHTS if qtype in KERNEL_TYPES else REQUANTIZED_WEIGHTS
    ours_logits, reference_logits = _logits(ours), _logits(reference)
    tolerance = fraction * reference_logits.abs().max()
    assert (ours_logits - reference_logits).abs().max() <= tolerance
    top2 = reference_logits.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > tolerance
    assert torch.equal(ours_logits.argmax(-1)[decided], reference_logits.argmax(-1)[decided])


@needs_kernels
@pytest.mark.parametrize("qtype", ["IQ4_XS", "IQ2_XS"])
def test_quantized_experts_hold_the_file_values(tmp_path: Path, qtype: str) -> None:
    # Each expert's share of a stack (layers/moe_quantized.py). Not the logits: a random model's
    # routing turns Q8_0's rounding into other experts' outputs.
    quantized_path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3_moe", qtype, overrides=QWEN3_MOE)
    experts = _load(quantized_path, tmp_path / "c").model.model.layers[1].mlp.experts
    assert experts.quantized is not None
    gate, up, down = (
        _file_values(quantized_path, f"blk.1.ffn_{part}_exps.weight") for part in ("gate", "up", "down")
    )
    for expert in range(QWEN3_MOE["num_experts"]):
        gate_up = dequantize_packed(experts.quantized.gate_up[expert].finish_whole()).numpy()
        _assert_holds_the_values(gate_up, np.concatenate([gate[expert], up[expert]]), qtype)
        held_down = dequantize_packed(experts.quantized.down[expert].finish_whole()).numpy()
        _assert_holds_the_values(held_down, down[expert], qtype)


def test_mixture_of_experts_dense_path_reads_the_reference_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_kernels(monkeypatch)
    quantized_path = write_tiny_gguf(
        tmp_path / "q" / "tiny.gguf", "qwen3_moe", "IQ3_XXS", overrides=QWEN3_MOE
    )
    ours = _load(quantized_path, tmp_path / "c")
    reference = _load(write_dequantized_copy(quantized_path, tmp_path / "f.gguf"), tmp_path / "c")
    experts, expected = ours.model.model.layers[1].mlp.experts, reference.model.model.layers[1].mlp.experts
    assert experts.quantized is None
    assert torch.equal(experts.gate_up_proj, expected.gate_up_proj)
    assert torch.equal(experts.down_proj, expected.down_proj)
    assert torch.equal(_logits(ours), _logits(reference))


def test_a_slow_load_logs_its_progress_and_the_types_that_make_it_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3_moe", "IQ3_S", overrides=QWEN3_MOE)
    reader = open_gguf(gguf_path)
    ticks = iter(range(0, 10_000, 20))  # 20 "seconds" pass between tensors
    monkeypatch.setattr("batchlm.models.gguf_progress.ANNOUNCED_BYTES", 0)
    with caplog.at_level(logging.INFO, logger="batchlm.models.gguf_progress"):
        weights = with_progress(
            iter_gguf_tensors(reader), reader, "GGUF tiny.gguf", REFERENCE_TYPES, clock=lambda: next(ticks)
        )
        loaded = [stored_bytes(weight) for _, weight in weights]
    # Every tensor's bytes are counted once, an expert stack's by its experts' shares.
    assert sum(loaded) == sum(t.data.nbytes for t in weight_tensors(reader))
    lines = [record.getMessage() for record in caplog.records]
    assert "GGUF tiny.gguf" in lines[0] and "IQ3_S tensors dequantize through the gguf package" in lines[0]
    assert len(lines) == len(loaded)  # the announcement, then one line a tensor after the first
    assert "of weights loaded" in lines[-1] and "s a GB; its IQ3_S tensors" in lines[-1]


def test_a_fast_load_logs_no_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "IQ4_XS")
    reader = open_gguf(gguf_path)
    with caplog.at_level(logging.INFO, logger="batchlm.models.gguf_progress"):
        list(
            with_progress(
                iter_gguf_tensors(reader), reader, "GGUF tiny.gguf", REFERENCE_TYPES, clock=lambda: 0.0
            )
        )
    assert not caplog.records
