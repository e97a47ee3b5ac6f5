"""Code blocks packed into the panels the quantized CPU kernels read (quant_panels.py): a weight
loaded whole or in parts, packed a few panels at a time, round-tripping to its values, and with
the biases left out where the scales give them bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchlm.kernels import quant_panels
from batchlm.kernels.quant_blocks import CodeBlocks, dequantize, from_gguf
from batchlm.layers.quantization.cpu_quantized import QuantizedStore
from cpu_quant_harness import RNG, random_gguf


def test_a_weight_loaded_whole_keeps_its_blocks_and_packs_as_one_loaded_in_parts() -> None:
    codes = RNG.integers(0, 16, (40, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (40, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, 4)
    whole = QuantizedStore(40, 64)
    whole.put(0, blocks)
    assert whole.codes is not None and np.shares_memory(whole.codes, codes)  # no copy of the codes
    parts = QuantizedStore(40, 64)
    for start, stop in ((0, 16), (16, 40)):
        parts.put(start, CodeBlocks(codes[start:stop], scales[start:stop], -scales[start:stop], 4))
    assert torch.equal(whole.finish().data, parts.finish().data)
    assert whole.codes is None  # released once packed
    # Rows no shard wrote stay zero: scale and bias 0.
    half = QuantizedStore(40, 64)
    half.put(8, CodeBlocks(codes[8:24], scales[8:24], -scales[8:24], 4))
    values = quant_panels.dequantize_packed(half.finish())
    assert torch.count_nonzero(values[:8]) == 0 and torch.count_nonzero(values[24:40]) == 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pack_panels", [1, 2, 16])
def test_packing_panel_chunks_gives_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, bits: int, pack_panels: int
) -> None:
    codes = RNG.integers(0, 2**bits, (37, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (37, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, bits)
    whole = quant_panels.pack(blocks)
    monkeypatch.setattr(quant_panels, "PACK_PANELS", pack_panels)
    assert torch.equal(quant_panels.pack(blocks).data, whole.data)


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_round_trips(bits: int) -> None:
    codes = RNG.integers(0, 2**bits, (37, 64), dtype=np.uint8)
    scales = RNG.uniform(0, 1, (37, 2)).astype(np.float16)
    blocks = CodeBlocks(codes, scales, -scales, bits)
    packed = quant_panels.pack(blocks)
    assert packed.data.shape == (3, 2 * (64 + (512 if bits == 8 else 256)))
    assert torch.equal(quant_panels.dequantize_packed(packed), torch.from_numpy(dequantize(blocks)))


@pytest.mark.parametrize(
    "type_name,zero",
    [
        *[("Q8_0", 128), ("Q4_0", 8), ("Q5_0", 16), ("Q4_1", 0), ("Q5_1", 0)],
        *[("Q3_K", 128), ("Q4_K", 0), ("Q5_K", 0), ("MXFP4", 128)],
    ],
)
def test_symmetric_formats_pack_their_scales_alone(type_name: str, zero: int) -> None:
    blocks = from_gguf(type_name, random_gguf(type_name, 37, 512), 37, 512)
    # (MXFP4's codes as themselves: its table panels are tested apart.)
    packed, stored = quant_panels.pack(blocks, tables=False), quant_panels.pack(blocks, omit_biases=False)
    assert packed.zero == zero and stored.zero == 0
    code_bytes = 16 * 32 // (2 if blocks.bits == 4 else 1)
    panel_bytes = 16 * 32 + 16 * code_bytes if zero else 16 * (64 + code_bytes)  # 16 blocks a panel
    assert packed.data.shape == (3, panel_bytes)
    if zero:
        assert packed.nbytes == stored.nbytes - 3 * 16 * 32
    for weight in (packed, stored):
        assert torch.equal(quant_panels.dequantize_packed(weight), torch.from_numpy(dequantize(blocks)))


def test_biases_the_scales_do_not_give_bit_for_bit_are_stored() -> None:
    codes = RNG.integers(0, 256, (20, 96), dtype=np.uint8)
    scales = RNG.uniform(0.001, 0.02, (20, 3)).astype(np.float16)
    biases = (scales.astype(np.float32) * -128).astype(np.float16)
    assert quant_panels.pack(CodeBlocks(codes, scales, biases, 8)).zero == 128
    off_by_an_ulp = biases.copy()
    off_by_an_ulp.view(np.uint16)[7, 1] += 1
    assert quant_panels.pack(CodeBlocks(codes, scales, off_by_an_ulp, 8)).zero == 0
    # -128 * 600 overflows float16: the stored bias is -inf, the computed one finite.
    large = np.full((20, 3), 600, dtype=np.float16)
    assert quant_panels.pack(CodeBlocks(codes, large, np.full_like(large, -np.inf), 8)).zero == 0
    # Padding rows (scale and bias 0) fit any zero point; a width of 3 blocks pads the scale rows.
    packed = quant_panels.pack(CodeBlocks(codes, scales, biases, 8))
    assert packed.data.shape == (2, 128 + 3 * 512)
