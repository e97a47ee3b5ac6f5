"""MXFP4 weights (gpt-oss's format), from GGUF blocks and from Hugging Face `_blocks` / `_scales`
pairs: decoded to the quantized CPU kernels' 8-bit code blocks bit for bit as gguf's reference and
transformers' own conversion read them; exponents beyond float16's range requantized to Q8_0. The
kernels' products on these blocks: tests/test_cpu_quant_kernels.py (GGUF_TYPES); a model's logits:
tests/test_cpu_quantized_model.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from batchlm.kernels import dense_blocks, quant_blocks, quant_panels
from batchlm.kernels.quant_blocks import MXFP4_EXPONENTS, UnrepresentableBlocks, dequantize, from_gguf
from batchlm.layers.quantization.base import QuantizedTensor
from batchlm.layers.quantization.cpu_quantized import code_blocks
from batchlm.models.mxfp4_weights import mxfp4_expert_weights, mxfp4_weight
from cpu_quant_harness import reference

BLOCK_BYTES = quant_blocks.GGUF_BLOCK_BYTES["MXFP4"]


def _gguf_blocks(exponents: np.ndarray, rng: np.random.Generator, blocks_a_row: int = 4) -> np.ndarray:
    """Random MXFP4 blocks with these exponent bytes, as [rows, row bytes]."""
    blocks = rng.integers(0, 256, (len(exponents), BLOCK_BYTES), dtype=np.uint8)
    blocks[:, 0] = exponents
    return blocks.reshape(-1, blocks_a_row * BLOCK_BYTES)


def _tensor(raw: np.ndarray) -> QuantizedTensor:
    cols = raw.shape[1] // BLOCK_BYTES * 32
    return QuantizedTensor("MXFP4", torch.from_numpy(raw), cols, 32, BLOCK_BYTES)


def test_gguf_blocks_are_the_reference_values_at_every_code_and_extreme_scale() -> None:
    """Every exponent float16 holds (its least subnormal 2^-24 and 2^8 at the ends), every code in
    both nibbles of a byte, and all-zero blocks (+0 and -0 codes) under exponents far outside that
    range (their scale 0): bit for bit gguf's values, as 8-bit codes of Q8_0's zero point."""
    rng = np.random.default_rng(0)
    exponents = np.array([*MXFP4_EXPONENTS, *MXFP4_EXPONENTS, 0, 255, 1, 254], dtype=np.uint8)
    blocks = _gguf_blocks(exponents, rng, blocks_a_row=2).reshape(-1, BLOCK_BYTES)
    every_code = np.arange(16, dtype=np.uint8)
    blocks[:16, 1:] = every_code | (every_code[::-1] << 4)  # value j and value j + 16 of each code
    blocks[-4:-2, 1:] = 0x88  # -0 everywhere
    blocks[-2:, 1:] = np.array([0x00, 0x80, 0x08], dtype=np.uint8)[rng.integers(0, 3, (2, 16))]
    raw = blocks.reshape(-1, 2 * BLOCK_BYTES)
    rows, cols = raw.shape[0], 64
    decoded = from_gguf("MXFP4", raw, rows, cols)
    assert decoded.bits == 8 and decoded.codes.min() == 128 - 12 and decoded.codes.max() == 128 + 12
    assert np.array_equal(dequantize(decoded), reference("MXFP4", raw, rows, cols))
    assert np.array_equal(decoded.scales.reshape(-1)[-4:], np.zeros(4, dtype=np.float16))
    assert quant_panels.symmetric_zero(decoded) == 128  # the panels keep the scales alone
    packed = quant_panels.pack(decoded)
    assert torch.equal(quant_panels.dequantize_packed(packed), torch.from_numpy(dequantize(decoded)))


@pytest.mark.parametrize("exponent", [MXFP4_EXPONENTS.start - 1, MXFP4_EXPONENTS.stop])
def test_exponents_beyond_float16_become_the_q8_0_of_the_values(
    exponent: int, caplog: pytest.LogCaptureFixture
) -> None:
    """One block of values whose scale float16 does not hold (2^-25 and below, 2^9 and above) makes
    its tensor Q8_0 blocks of the reference values, with a warning; the whole tensor stays on the
    kernels."""
    rng = np.random.default_rng(1)
    exponents = rng.integers(118, 124, 16).astype(np.uint8)
    exponents[5] = exponent
    raw = _gguf_blocks(exponents, rng)
    raw.reshape(-1, BLOCK_BYTES)[5, 1] |= 0x01  # a nonzero value in that block
    with pytest.raises(UnrepresentableBlocks, match=f"exponent byte {exponent}"):
        from_gguf("MXFP4", raw, 4, 128)
    with caplog.at_level(logging.WARNING):
        blocks = code_blocks(_tensor(raw))
    expected = dense_blocks.from_dense_q8(reference("MXFP4", raw, 4, 128))
    assert "becomes Q8_0 blocks" in caplog.text
    assert blocks.bits == 8
    assert np.array_equal(blocks.codes, expected.codes) and np.array_equal(blocks.scales, expected.scales)


def _hf_pair(
    rng: np.random.Generator, experts: int, rows: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = rng.integers(0, 256, (experts, rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (experts, rows, groups), dtype=np.uint8)
    return torch.from_numpy(blocks), torch.from_numpy(scales)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf's, to inf on purpose
def test_hf_blocks_read_as_transformers_converts_them() -> None:
    """An HF expert stack (gpt-oss's gate_up_proj_blocks [E, 2I, H / 32, 16]) is the [E * 2I, H]
    weight whose expert e is transformers' dequantized [H, 2I] transposed: every byte value and
    every exponent byte (transformers' float32 ldexp and gguf's doubled values agree to the bit, inf
    for the largest included); each expert's share is its own rows."""
    transformers_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(2)
    blocks, scales = _hf_pair(rng, 3, 96, 8)
    blocks[0, :16, 0] = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # every byte
    scales[1, :32] = torch.arange(256, dtype=torch.uint8).reshape(32, 8)  # every exponent
    expected = transformers_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    weight = mxfp4_weight(blocks, scales)
    assert weight.qtype == "MXFP4" and weight.shape == (3 * 96, 8 * 32)
    ours = weight.dequantize().reshape(3, 96, 256)
    assert torch.equal(ours, expected.transpose(1, 2))
    for expert, share in enumerate(mxfp4_expert_weights(blocks, scales)):
        assert share.shape == (96, 256)
        assert torch.equal(share.data, weight.data[expert * 96 : (expert + 1) * 96])


def test_hf_blocks_become_the_kernels_code_blocks_exactly() -> None:
    """Realistic exponents (a weight's magnitudes around 2^-6) on the quantized CPU path: the code
    blocks hold transformers' values bit for bit."""
    transformers_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(3)
    blocks, scales = _hf_pair(rng, 1, 40, 8)
    scales = torch.from_numpy(rng.integers(112, 128, scales.shape, dtype=np.uint8))
    expected = transformers_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0].t()
    blocks_of_weight = code_blocks(mxfp4_weight(blocks, scales))
    assert blocks_of_weight.bits == 8
    assert np.array_equal(dequantize(blocks_of_weight), expected.numpy())


def test_hf_pairs_of_mismatched_shapes_or_types_are_refused() -> None:
    blocks, scales = _hf_pair(np.random.default_rng(4), 2, 8, 4)
    with pytest.raises(ValueError, match="not"):
        mxfp4_weight(blocks, scales[:, :, :3])
    with pytest.raises(ValueError, match="uint8"):
        mxfp4_weight(blocks, scales.to(torch.int32))
    with pytest.raises(ValueError, match="E, rows, groups, 16"):
        mxfp4_expert_weights(blocks[0], scales[0])
