"""Hugging Face MXFP4 weights (`quantization_config: {"quant_method": "mxfp4"}`: gpt-oss's experts)
as the loader hands weights to layers: a QuantizedTensor of GGML type MXFP4, the very form a GGUF
file's MXFP4 tensor takes, so every path that reads GGUF blocks (the quantized CPU kernels exactly,
the dense paths through QuantizedTensor.dequantize) reads these too.

A checkpoint stores each MXFP4 projection as `<name>_blocks` (uint8 [..., rows, groups, 16]: per
row, groups of 32 input values, two 4-bit e2m1 codes a byte, value 2j of a group in the low nibble
of byte j and 2j + 1 in the high one) and `<name>_scales` (uint8 [..., rows, groups]: the exponent
byte e of the group's scale 2^(e - 127)). Rows are output features and groups run along the inputs:
the [out, in] weight of a linear, the transpose of what transformers' dequantization returns
(gpt-oss's gate_up_proj_blocks [E, 2I, H / 32, 16] are each expert's [2I, H] weight, gate and up
rows interleaved: even rows gate, odd rows up; down_proj_blocks [E, H, I / 32, 16] each [H, I]).
"""

from __future__ import annotations

import torch

from batchlm.kernels import quant_blocks
from batchlm.layers.quantization.base import QuantizedTensor

MXFP4 = "MXFP4"


def mxfp4_weight(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedTensor:
    """The [rows, groups * 32] weight of an HF MXFP4 `<name>_blocks` / `<name>_scales` pair (uint8
    [..., rows, groups, 16] and [..., rows, groups]), leading dimensions folded into the rows: a stack
    of E experts gives [E * rows, cols], expert e its rows [e * rows, (e + 1) * rows) (`narrow_rows`,
    or mxfp4_expert_weights). Converted where the pair is (a GPU's loads move it there first)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} are not "
            "[..., groups, 16] and [..., groups]"
        )
    groups = scales.shape[-1]
    data = _gguf_blocks(blocks, scales.to(blocks.device)).reshape(
        -1, groups * quant_blocks.GGUF_BLOCK_BYTES[MXFP4]
    )
    block_size, block_bytes = quant_blocks.GGUF_BLOCK_SIZE[MXFP4], quant_blocks.GGUF_BLOCK_BYTES[MXFP4]
    return QuantizedTensor(MXFP4, data, groups * block_size, block_size, block_bytes)


def _gguf_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """GGUF MXFP4 blocks (uint8 [..., groups, 17]: the scale byte, then byte i holding value i in its
    low nibble and value i + 16 in its high one) of HF's (value 2j in the low nibble of byte j, 2j + 1
    in the high one). The codes and exponent bytes are the same numbers in both forms (GGUF doubles
    the values and halves the scale); only the nibbles' order differs: GGUF's byte 2m holds the low
    nibbles of HF's bytes m and m + 8, its byte 2m + 1 their high nibbles."""
    first, second = blocks[..., :8], blocks[..., 8:]
    even = (first & 0x0F) | (second << 4)
    odd = (first >> 4) | (second & 0xF0)
    packed = torch.stack([even, odd], dim=-1).flatten(-2)
    return torch.cat([scales.unsqueeze(-1), packed], dim=-1)


def mxfp4_expert_weights(blocks: torch.Tensor, scales: torch.Tensor) -> list[QuantizedTensor]:
    """Each expert's [rows, groups * 32] weight of a stacked HF MXFP4 pair (uint8 [E, rows, groups,
    16] and [E, rows, groups]), views of one conversion."""
    if blocks.dim() != 4:
        raise ValueError(f"stacked MXFP4 expert blocks are [E, rows, groups, 16], not {tuple(blocks.shape)}")
    experts, rows = blocks.shape[0], blocks.shape[1]
    whole = mxfp4_weight(blocks, scales)
    return [whole.narrow_rows(expert * rows, rows) for expert in range(experts)]
