"""What every weight format implements: the LinearMethod interface and the tensors it is handed.

A layer (linear, token embedding, LM head) owns its sizes and its tensor-parallel split; its method
owns how the weight is stored and multiplied. The loader hands a method either a dense tensor or a
QuantizedTensor (a GGUF tensor kept as its raw blocks), always with the rows it goes to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from batchlm.layers.quantization.forms import Fp8Weight, Int4Weight, Int8Weight

if TYPE_CHECKING:
    from batchlm.layers.quantization.layer import MethodLayer


@dataclass(frozen=True)
class RowSlice:
    """Where one HF tensor's rows go: rows [src_start, src_start + rows) of a tensor with
    `full_rows` rows are copied to rows [dst_start, dst_start + rows) of this rank's parameter."""

    full_rows: int
    src_start: int
    rows: int
    dst_start: int


@dataclass(frozen=True)
class QuantizedTensor:
    """A block-quantized [rows, cols] matrix as its raw bytes: `data` is uint8 [rows, row_bytes].

    Each row is an independent byte string (blocks never span rows), so row ranges (fused q/k/v and
    gate/up shards, column-parallel splits) are plain slices; column ranges must fall on block edges.
    `qtype` is the GGML type name (e.g. "Q4_K").
    """

    qtype: str
    data: torch.Tensor
    cols: int
    # Elements and bytes per block of `qtype`.
    block_size: int
    block_bytes: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    def narrow_rows(self, start: int, length: int) -> QuantizedTensor:
        return QuantizedTensor(
            self.qtype, self.data.narrow(0, start, length), self.cols, self.block_size, self.block_bytes
        )

    def select_rows(self, order: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(
            self.qtype, self.data.index_select(0, order), self.cols, self.block_size, self.block_bytes
        )

    def narrow_cols(self, start: int, length: int) -> QuantizedTensor:
        """Columns [start, start + length) of every row; both must be multiples of the block size."""
        if start % self.block_size or length % self.block_size:
            raise ValueError(
                f"a {self.qtype} tensor splits only on {self.block_size}-column blocks; "
                f"columns {start}..{start + length} do not (choose another tensor-parallel size)"
            )
        first, count = start // self.block_size, length // self.block_size
        data = self.data.narrow(1, first * self.block_bytes, count * self.block_bytes)
        return QuantizedTensor(self.qtype, data, length, self.block_size, self.block_bytes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [rows, cols] values in `dtype` (computed in float32 by the gguf package's reference code,
        row chunks on the engine's CPU threads: reference_rows.py)."""
        from batchlm.layers.quantization import reference_rows

        on_host = self if self.data.device.type == "cpu" else replace(self, data=self.data.cpu())
        return reference_rows.dequantize(on_host, dtype)


@dataclass(frozen=True)
class QuantizedColumns:
    """Columns [start, start + cols) of `blocks`, the whole blocks that cover them: a row-parallel
    split that falls inside blocks (K-quants' 256-value super-blocks over fewer columns per rank),
    still as the file's bytes, so a method reads the same values the unsplit tensor gives it."""

    blocks: QuantizedTensor
    start: int
    cols: int

    @property
    def qtype(self) -> str:
        return self.blocks.qtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.blocks.data.shape[0], self.cols))

    def narrow_rows(self, start: int, length: int) -> QuantizedColumns:
        return QuantizedColumns(self.blocks.narrow_rows(start, length), self.start, self.cols)

    def select_rows(self, order: torch.Tensor) -> QuantizedColumns:
        return QuantizedColumns(self.blocks.select_rows(order), self.start, self.cols)

    def narrow_cols(self, start: int, length: int) -> QuantizedTensor | QuantizedColumns:
        return columns_of(self.blocks, self.start + start, length)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.blocks.dequantize().narrow(1, self.start, self.cols).to(dtype)


def columns_of(tensor: QuantizedTensor, start: int, length: int) -> QuantizedTensor | QuantizedColumns:
    """Columns [start, start + length) of a quantized tensor, its blocks kept whole: the plain slice
    where both ends fall on block edges, else the covering blocks with the window inside them."""
    size = tensor.block_size
    if start % size == 0 and length % size == 0:
        return tensor.narrow_cols(start, length)
    first, end = start // size * size, -(-(start + length) // size) * size
    return QuantizedColumns(tensor.narrow_cols(first, end - first), start - first, length)


# What the loader hands a layer: a dense tensor or a quantized one (GGUF blocks, whole or a column
# window of them, or a quantized safetensors weight in our layout: forms.py).
LoadedWeight = torch.Tensor | QuantizedTensor | QuantizedColumns | Fp8Weight | Int4Weight | Int8Weight


def as_dense(loaded: LoadedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The tensor's values as a dense tensor (dequantized when quantized)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.dequantize(dtype)


def narrow_cols(loaded: LoadedWeight, start: int, length: int) -> LoadedWeight:
    """Columns [start, start + length). A GGUF tensor stays its blocks: a split inside them (e.g.
    256-value K-quant blocks over few columns per rank) comes back as a QuantizedColumns window, which
    each method reads as it reads the whole tensor (the quantized CPU kernels' per-32 blocks exactly)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(1, start, length)
    if isinstance(loaded, QuantizedTensor):
        return columns_of(loaded, start, length)
    return loaded.narrow_cols(start, length)


def narrow_rows(loaded: LoadedWeight, start: int, length: int) -> LoadedWeight:
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(0, start, length)
    return loaded.narrow_rows(start, length)


def select_rows(loaded: LoadedWeight, order: torch.Tensor) -> LoadedWeight:
    """The tensor's rows in `order` (int64 row indices): whole rows move, so a quantized row keeps its
    bytes and its scales."""
    if isinstance(loaded, torch.Tensor):
        return loaded.index_select(0, order)
    return loaded.select_rows(order)


class LinearMethod(ABC):
    """How one layer's [rows, cols] weight is stored, loaded and applied.

    Methods are stateless: what they create lives on the layer (as parameters, buffers or plain
    attributes), so one method object serves every layer that uses it. The layer calls, in order:
    create_weights once (again when the method is swapped), load_rows once per checkpoint shard,
    process_after_loading once the weights are final (after any LoRA merge), then apply/embed.
    """

    @abstractmethod
    def create_weights(
        self, layer: MethodLayer, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Create the layer's (still empty) storage for a [rows, cols] weight."""

    @abstractmethod
    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        """Copy rows `where` of checkpoint tensor `name` (already cut to this rank's columns)."""

    def process_after_loading(self, layer: MethodLayer) -> bool:
        """Turn the loaded weight into the form apply() wants; True when that changed anything."""
        return False

    @abstractmethod
    def apply(self, layer: MethodLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, cols] @ W^T (+ bias) -> [T, rows]."""

    def apply_silu_gated(
        self, layer: MethodLayer, gate_up: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """silu(gate) * up @ W^T (+ bias) for gate_up [T, 2 * cols] ([gate | up]), the activation made
        inside the product; None where the method has no such path for this input (the caller then
        applies SiLU-and-mul, then apply())."""
        del layer, gate_up, bias
        return None

    def tune_decode(self, layers: Sequence[MethodLayer], dtype: torch.dtype) -> None:
        """Time decode-sized launches for `layers` (one weight shape, on a GPU); most methods have none."""
        del layers, dtype

    @abstractmethod
    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight, [T] -> [T, cols] (token embeddings)."""

    def share_weights(self, source: MethodLayer, target: MethodLayer) -> None:
        """Make `target` use `source`'s weight storage (a tied LM head and its embedding)."""
        target.weight = source.weight
