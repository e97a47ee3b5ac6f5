"""Table panels (kernels/quant_panels.py, cpu_quant_kernels.c): IQ4_NL's, IQ4_XS's and MXFP4's 8-bit
codes kept as 4-bit indices into a 16-code table at each panel's head, expanded by one byte shuffle.
They must give the bits of the same codes in 8-bit panels on every instruction path (AVX2, AVX-512
VNNI, AMX tiles) for linears, embedding rows, experts and the fused decode stack, from 4.5 bits a
weight instead of 8.5."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels import cpu_quant, quant_panels
from batchlm.kernels.quant_blocks import CodeBlocks, from_gguf
from batchlm.layers.moe import FusedMoE
from batchlm.layers.quantization.cpu_quantized import QuantizedStore, store
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import LoadedModel, load_model
from batchlm.runner.fused_decode import FusedDecode, build_fused_decode
from batchlm.runner.inputs import StepInputs
from cpu_isa import kernel_path
from cpu_quant_harness import needs_kernel, random_gguf
from gguf_builder import random_blocks, write_tiny_gguf
from models_harness import Chunk, build_step, make_kv_caches, run_step
from test_gguf_loading import QWEN3_MOE

TABLE_TYPES = ["IQ4_NL", "IQ4_XS", "MXFP4"]


@pytest.fixture(params=["auto", "avx512", "avx2"])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    with kernel_path(request.param):
        yield request.param


def _blocks(type_name: str, rows: int, cols: int) -> CodeBlocks:
    if type_name == "MXFP4":
        raw = random_gguf(type_name, rows, cols)
    else:
        raw = random_blocks((rows, cols), type_name, np.random.default_rng(rows))
    return from_gguf(type_name, raw, rows, cols)


@pytest.mark.parametrize("type_name", TABLE_TYPES)
def test_table_panels_hold_the_indices_in_four_and_a_half_bits(type_name: str) -> None:
    rows, cols = 37, 512
    blocks = _blocks(type_name, rows, cols)
    table, wide = quant_panels.pack(blocks), quant_panels.pack(blocks, tables=False)
    assert table.table and table.bits == 4 and table.zero == 128 and not wide.table and wide.bits == 8
    assert table.layout == 1 | 7 << 1 | quant_panels.LAYOUT_TABLE
    blocks_a_row = cols // 32
    # A panel: its table's head, 16 scales a block, 16 rows of 16 bytes of indices a block.
    assert table.data.shape == (3, 64 + blocks_a_row * (32 + 16 * 16))
    assert 8 * table.nbytes / (48 * cols) == pytest.approx(4.5, abs=0.1)
    assert torch.equal(quant_panels.dequantize_packed(table), quant_panels.dequantize_packed(wide))


def test_codes_outside_their_table_are_refused() -> None:
    blocks = _blocks("MXFP4", 16, 64)
    blocks.codes[3, 5] = 0  # no MXFP4 value's code
    with pytest.raises(ValueError, match="table does not"):
        quant_panels.pack(blocks)


def test_a_store_packs_a_table_where_every_row_has_it() -> None:
    mxfp4, iq4 = _blocks("MXFP4", 32, 256), _blocks("IQ4_NL", 16, 256)
    whole = QuantizedStore(48, 256)
    whole.put(0, mxfp4)
    whole.put(32, _rows(mxfp4, 0, 16))
    assert whole.finish_whole().table
    gap = QuantizedStore(48, 256)
    gap.put(0, mxfp4)  # rows 32..47 never loaded: code 0, which the table lacks
    assert not gap.finish_whole().table
    mixed = QuantizedStore(48, 256)  # two tables: one part each (whole panels)
    mixed.put(0, mxfp4)
    mixed.put(32, iq4)
    parted = mixed.finish()
    assert isinstance(parted, quant_panels.PartedWeight) and all(part.table for part in parted.parts)
    widened = QuantizedStore(48, 256, keep_parts=False)
    widened.put(0, mxfp4)
    widened.put(32, iq4)
    assert not widened.finish_whole().table


def _rows(blocks: CodeBlocks, start: int, stop: int) -> CodeBlocks:
    rows = slice(start, stop)
    return CodeBlocks(blocks.codes[rows], blocks.scales[rows], blocks.biases[rows], blocks.bits, blocks.table)


@needs_kernel
@pytest.mark.parametrize("type_name", TABLE_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 70])
def test_table_panels_give_the_bits_of_8_bit_panels(isa: str, type_name: str, rows: int) -> None:
    blocks = _blocks(type_name, 37, 512)
    table, wide = quant_panels.pack(blocks), quant_panels.pack(blocks, tables=False)
    x, bias = torch.randn(rows, 512) * 3, torch.randn(37)
    assert torch.equal(cpu_quant.quant_linear(x, table, bias), cpu_quant.quant_linear(x, wide, bias))
    ids = torch.tensor([0, 15, 16, 36])
    assert torch.equal(cpu_quant.quant_rows(table, ids), cpu_quant.quant_rows(wide, ids))


def _load(
    tmp_path: Path, qtype: str, model_type: str, tables: bool, monkeypatch: pytest.MonkeyPatch
) -> LoadedModel:
    monkeypatch.setattr(quant_panels, "TABLES", tables)
    overrides = QWEN3_MOE if model_type == "qwen3_moe" else None
    path = tmp_path / "tiny.gguf"
    if not path.exists():
        write_tiny_gguf(path, model_type, qtype, tied=True, overrides=overrides)
    return load_model(
        prepare_gguf_model_dir(path, tmp_path / "c"), torch.float32, torch.device("cpu"), progress=False
    )


def _steps(loaded: LoadedModel, rows: int) -> list[torch.Tensor]:
    """A prefill's logits, then two fused decode steps' (rows requests)."""
    prompts = [[3 + (5 * r + j) % 200 for j in range(3 + r % 7)] for r in range(rows)]
    caches = make_kv_caches(loaded, 4 * rows)
    blocks = [[4 * r + i for i in range(4)] for r in range(rows)]
    logits = [run_step(loaded.model, caches, [Chunk(p, 0, blocks[r]) for r, p in enumerate(prompts)])]
    fused = build_fused_decode(loaded.model, caches, TorchAttentionBackend())
    assert isinstance(fused, FusedDecode)
    for step in range(2):
        tokens = logits[-1].argmax(-1).tolist()
        chunks = [Chunk([tokens[r]], len(p) + step, blocks[r]) for r, p in enumerate(prompts)]
        input_ids, positions, meta = build_step(chunks, caches[0].shape[2])
        inputs = StepInputs(input_ids, positions, meta, torch.arange(rows), [str(r) for r in range(rows)])
        logits.append(fused.run(inputs))
    return logits


@needs_kernel
@pytest.mark.parametrize(("qtype", "model_type"), [("MXFP4", "qwen3_moe"), ("IQ4_NL", "llama")])
def test_models_on_table_panels_give_the_bits_of_8_bit_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isa: str, qtype: str, model_type: str
) -> None:
    """Every linear, the tied embedding and LM head, the experts and the fused decode stack on table
    panels: the logits of a prefill and of decode steps (1 and 16 rows: AMX tiles for 4-bit panels
    from 16) bit for bit those of the same codes in 8-bit panels."""
    results = {}
    for tables in (True, False):
        loaded = _load(tmp_path, qtype, model_type, tables, monkeypatch)
        results[tables] = [_steps(loaded, rows) for rows in (1, 16)]  # (packs the tied weight lazily)
        assert store(loaded.model.lm_head).finish_whole().table == tables
        for layer in (m for m in loaded.model.modules() if isinstance(m, FusedMoE)):
            assert layer.quantized is not None and layer.quantized.gate_up[0].finish_whole().table == tables
    for ours, theirs in zip(results[True], results[False], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
