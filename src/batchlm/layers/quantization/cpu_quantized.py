"""Quantized weights that stay quantized on x86-64 CPUs: GGUF blocks, FP8 and 4-bit safetensors
checkpoints' linears and experts (4-bit groups of whole blocks as 4-bit blocks, FP8 values as Q8_0)
and dense checkpoints quantized at load (--quantization int8 and fp8: every layer to Q8_0; w4a16: the
linears to 4-bit blocks, kernels/dense_blocks.py, the rest Q8_0) run through our
integer-dot-product kernels (kernels/cpu_quant.py) for linears and the LM head; the token embedding
looks rows up in the same packed data, so a tied LM head and its embedding hold one copy.

As shards load, each becomes per-32 code blocks (quant_blocks.py): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q3_K, Q4_K, Q5_K, IQ4_NL, IQ4_XS and MXFP4 from their blocks (Q3_K, the 5-bit types, the IQ4s and
MXFP4 as 8-bit codes; an MXFP4 tensor with an exponent beyond float16's range as Q8_0 of its values);
other GGML types (Q6_K, Q2_K, the other i-quants, TQ1_0, TQ2_0: gguf_types.SUPPORTED_TYPES) and dense
tensors are requantized to Q8_0 from their float values (8-bit blocks add an error about 1/4 of a
Q6_K step). A fused layer (q/k/v, gate/up) whose shards come in different code widths (a Q4_K_M
file's Q4_K queries and keys beside its Q6_K values) packs each run of one width apart, as parts of
one weight (quant_panels.PartedWeight); where its shard boundaries do not fall on the kernels' 16-row
panels, or parts are not wanted (a mixture-of-experts layer's experts), its 4-bit shards widen to 8
bits instead, losslessly. Once loading is done the blocks are packed into the kernels' panel layout
(the IQ4s' and MXFP4's 8-bit codes as 4-bit indices into their table, where every row has it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from batchlm.kernels import dense_blocks, quant_blocks
from batchlm.kernels.cpu_quant import (
    q6_k_as_q8,
    quant_library,
    quant_linear,
    quant_rows,
)
from batchlm.kernels.quant_blocks import BLOCK, CodeBlocks
from batchlm.kernels.quant_panels import MAX_PARTS, QPANEL, PackedWeight, PartedWeight, QuantizedWeight, pack
from batchlm.layers.quantization import reference_rows
from batchlm.layers.quantization.base import (
    LinearMethod,
    LoadedWeight,
    QuantizedColumns,
    QuantizedTensor,
    RowSlice,
    as_dense,
    narrow_rows,
)
from batchlm.layers.quantization.forms import GroupedCodes, Int8Weight

if TYPE_CHECKING:
    from batchlm.layers.quantization.layer import MethodLayer

logger = logging.getLogger(__name__)
# A shard's form: its code width, and the bytes of the table its codes are drawn from (b"": none).
Form = tuple[int, bytes]


class QuantizedStore:
    """One weight's code blocks while it loads, then its packed form. Shared by reference between a
    tied LM head and its embedding (whichever finishes first packs it for both). keep_parts: a fused
    weight whose shards differ in code width may pack as parts (else it widens to one form)."""

    def __init__(self, rows: int, cols: int, *, keep_parts: bool = True) -> None:
        if cols % BLOCK:
            raise ValueError(f"quantized CPU weights need a multiple of {BLOCK} inputs, not {cols}")
        self.rows, self.cols = rows, cols
        # Allocated at the first put that covers only part of the rows; a weight loaded in one piece
        # keeps that piece's arrays (no copy of an embedding's codes).
        self.codes: np.ndarray | None = None
        self.scales: np.ndarray | None = None
        self.biases: np.ndarray | None = None
        self.keep_parts = keep_parts
        # (first row, end row, form) of each put: its code width, and its code table's bytes (or b"").
        self.shards: list[tuple[int, int, Form]] = []
        self.packed: PackedWeight | None = None

    def put(self, start: int, blocks: CodeBlocks) -> None:
        end = start + blocks.codes.shape[0]
        table = b"" if blocks.table is None else blocks.table.tobytes()
        self.shards.append((start, end, (blocks.bits, table)))
        if self.codes is None and start == 0 and blocks.codes.shape == (self.rows, self.cols):
            self.codes = np.ascontiguousarray(blocks.codes, dtype=np.uint8)
            self.scales = np.ascontiguousarray(blocks.scales, dtype=np.float16)
            self.biases = np.ascontiguousarray(blocks.biases, dtype=np.float16)
            return
        codes, scales, biases = self._arrays()
        codes[start:end] = blocks.codes
        scales[start:end] = blocks.scales
        biases[start:end] = blocks.biases

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.codes is None or self.scales is None or self.biases is None:
            self.codes = np.zeros((self.rows, self.cols), dtype=np.uint8)
            self.scales = np.zeros((self.rows, self.cols // BLOCK), dtype=np.float16)
            self.biases = np.zeros((self.rows, self.cols // BLOCK), dtype=np.float16)
        return self.codes, self.scales, self.biases

    def finish(self) -> PackedWeight:
        """The packed weight (packed on the first call; the load-time arrays are released)."""
        if self.packed is None:
            codes, scales, biases = self._arrays()
            runs = self._form_runs()
            if self.keep_parts and runs is not None and len(runs) > 1:
                self.packed = PartedWeight(
                    tuple(pack(_blocks_of(codes[a:b], scales[a:b], biases[a:b], form)) for a, b, form in runs)
                )
            else:
                four_bit = all(bits == 4 for _, _, (bits, _) in self.shards)
                # One table for every row, where every shard has it (rows no shard filled hold code 0).
                one_table = runs is not None and len(runs) == 1 and runs[0][2][1] != b""
                form = (4 if four_bit else 8, runs[0][2][1] if runs and one_table else b"")
                self.packed = pack(_blocks_of(codes, scales, biases, form))
            self.codes = self.scales = self.biases = None
        return self.packed

    def finish_whole(self) -> QuantizedWeight:
        """finish() of a weight that packs in one form (keep_parts off, or one code width)."""
        packed = self.finish()
        if not isinstance(packed, QuantizedWeight):
            raise TypeError("this weight was packed as parts; its users take one form")
        return packed

    def _form_runs(self) -> list[tuple[int, int, Form]] | None:
        """The rows as runs [first, end) of one form (code width and table), where the shards cover
        every row once, every run but the first starts on a panel and there are at most MAX_PARTS;
        else None."""
        runs: list[tuple[int, int, Form]] = []
        for start, end, form in sorted(self.shards):
            if start != (runs[-1][1] if runs else 0):
                return None  # a gap or an overlap
            if runs and runs[-1][2] == form:
                runs[-1] = (runs[-1][0], end, form)
            else:
                runs.append((start, end, form))
        if not runs or runs[-1][1] != self.rows or len(runs) > MAX_PARTS:
            return None
        return runs if all(start % QPANEL == 0 for start, _, _ in runs) else None


def _blocks_of(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, form: Form) -> CodeBlocks:
    bits, table = form
    return CodeBlocks(codes, scales, biases, bits, np.frombuffer(table, dtype=np.uint8) if table else None)


def code_blocks(loaded: LoadedWeight, dense_bits: int = 8) -> CodeBlocks:
    """A loaded tensor's rows as code blocks: exact for the GGUF types the kernels read, 4-bit (8-bit)
    blocks for a checkpoint's 4-bit (GPTQ's 8-bit) groups of whole blocks, Q8_0 of the float
    values otherwise (FP8 checkpoints' among them, and act-order 4-bit weights: their groups are not
    runs of inputs, and the kernels read a layer's inputs in order). A dense tensor becomes 4-bit
    blocks where `dense_bits` is 4 (--quantization w4a16)."""
    if isinstance(loaded, QuantizedColumns) and loaded.start % BLOCK == 0 and loaded.cols % BLOCK == 0:
        # A tensor-parallel share inside K-quant super-blocks: the covering blocks' per-32 blocks,
        # cut on their edges, are the very blocks one rank would hold (never requantized per rank).
        return quant_blocks.columns(code_blocks(loaded.blocks), loaded.start, loaded.cols)
    if isinstance(loaded, QuantizedTensor):
        rows, cols = loaded.shape
        if quant_blocks.supported(loaded.qtype):
            # Our own decoders, row chunks on the load's threads.
            raw = loaded.data.contiguous().numpy()
            try:
                return quant_blocks.from_gguf(loaded.qtype, raw, rows, cols, reference_rows.row_chunks(cols))
            except quant_blocks.UnrepresentableBlocks as unrepresentable:
                # (MXFP4 exponents beyond float16's range: values no weight has in practice.)
                logger.warning(
                    "a %s tensor becomes Q8_0 blocks of its values: %s", loaded.qtype, unrepresentable
                )
                return reference_rows.q8_code_blocks(loaded)
        if loaded.qtype == "Q6_K" and (native := q6_k_as_q8(loaded.data.numpy(), rows, cols)) is not None:
            return native
        return reference_rows.q8_code_blocks(loaded)
    if (
        isinstance(loaded, GroupedCodes)
        and loaded.input_order is None
        and loaded.group_size % BLOCK == 0
        and loaded.shape[1] % BLOCK == 0
    ):
        return quant_blocks.from_int_groups(
            loaded.codes.cpu().numpy(),
            loaded.scales.float().cpu().numpy(),
            loaded.zeros.cpu().numpy(),
            loaded.group_size,
            8 if isinstance(loaded, Int8Weight) else 4,
        )
    dense = as_dense(loaded, torch.float32).detach()
    rows, cols = dense.shape
    quantize = dense_blocks.q8_from_row_chunks
    if dense_bits == 4 and isinstance(loaded, torch.Tensor):
        quantize = dense_blocks.q4_from_row_chunks
    return quantize(rows, cols, lambda start, stop: dense[start:stop].float().cpu().numpy())


class CpuQuantizedLinearMethod(LinearMethod):
    """Weights as QuantizedStore (layer.quantized); `weight` is left an empty [0, cols] parameter."""

    # The code width dense tensors are quantized to: Q8_0 here, 4-bit blocks in the subclass below.
    dense_bits: ClassVar[int] = 8

    def create_weights(
        self, layer: MethodLayer, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        setattr(layer, "quantized", QuantizedStore(rows, cols))  # noqa: B010 (a plain attribute, not a tensor)
        layer.weight = nn.Parameter(torch.empty(0, cols, dtype=dtype, device=device), requires_grad=False)
        layer.packed = None
        layer.onednn_weight = None

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        part = narrow_rows(loaded, where.src_start, where.rows)
        store(layer).put(where.dst_start, code_blocks(part, self.dense_bits))

    def process_after_loading(self, layer: MethodLayer) -> bool:
        store(layer).finish()
        return True

    def apply(self, layer: MethodLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = quant_linear(x, store(layer).finish(), bias)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        rows = quant_rows(store(layer).finish_whole(), ids)
        return rows if layer.params_dtype == torch.float32 else rows.to(layer.params_dtype)

    def share_weights(self, source: MethodLayer, target: MethodLayer) -> None:
        setattr(target, "quantized", store(source))  # noqa: B010
        target.weight = source.weight


def store(layer: MethodLayer) -> QuantizedStore:
    quantized = layer.__dict__.get("quantized")
    assert isinstance(quantized, QuantizedStore), "the layer's weights were not created by this method"
    return quantized


class CpuQuantized4BitLinearMethod(CpuQuantizedLinearMethod):
    """Dense linears as 4-bit blocks (--quantization w4a16 on a CPU); named apart in the load's log."""

    dense_bits: ClassVar[int] = 4


CPU_QUANTIZED = CpuQuantizedLinearMethod()
CPU_QUANTIZED_4BIT = CpuQuantized4BitLinearMethod()


def kernels_available() -> bool:
    return quant_library() is not None
