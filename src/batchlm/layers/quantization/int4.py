"""W4A16: 4-bit weights with per-group scales and zero points, 16-bit activations, through our Triton
kernel (kernels/w4a16_gemm.py) on CUDA and a dequantized matmul elsewhere (CPU tests; a checkpoint's
4-bit layers on an x86-64 CPU take the quantized CPU kernels instead, registry.py).

Weights arrive as Int4Weight (GPTQ, AWQ and compressed-tensors checkpoints, unpacked by the loader
into one layout) or dense (--quantization w4a16: symmetric round-to-nearest per group as they load).
While loading, a layer keeps one code byte per weight; once loaded they are packed eight to an int32
for the kernel (kernels/int4_pack.py) and the bytes are released.

At decode sizes (1..16 rows of 16-bit activations on a GPU) the launch is a plan timed per weight
shape at start-up (kernels/decode_plans.py): one row takes the GEMV kernel (kernels/w4a16_gemv.py),
2..16 rows the GEMM kernel with a launch shape picked for them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.decode_plans import (
    GemvConfig,
    PlanKey,
    PlanTable,
    bias_of,
    bucket_rows,
    takes_decode_kernel,
)
from batchlm.kernels.int4_pack import PackedInt4, dequantize_packed, pack_int4
from batchlm.layers.quantization.base import LinearMethod, LoadedWeight, RowSlice
from batchlm.layers.quantization.forms import Int4Weight, in_input_order

if TYPE_CHECKING:
    from batchlm.kernels.w4a16_gemm import W4A16Config
    from batchlm.layers.quantization.layer import MethodLayer

# Group size for dense weights quantized at load (--quantization w4a16), as common 4-bit checkpoints.
DEFAULT_GROUP_SIZE = 128


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> Int4Weight:
    """Symmetric round-to-nearest 4-bit codes per group: zero 8, scale = the group's amax / 7."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(dim=2) / 7.0).clamp(min=1e-8)
    codes = (groups / scales[:, :, None]).round().clamp(-8, 7) + 8
    zeros = torch.full_like(scales, 8, dtype=torch.uint8)
    return Int4Weight(codes.to(torch.uint8).reshape(rows, cols), scales.to(weight.dtype), zeros, group_size)


def default_group_size(cols: int) -> int:
    for size in (DEFAULT_GROUP_SIZE, 64, 32):
        if cols % size == 0:
            return size
    raise ValueError(f"4-bit weights need a multiple of 32 inputs, not {cols}")


class Int4Store:
    """One layer's codes, scales and zero points while it loads; then its packed form."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=device)
        self.group_size = 0  # set by the first shard
        self.scales = torch.empty(0)
        self.zeros = torch.empty(0)
        # Act-order weights: the input each stored column multiplies (forms.Int4Weight), one order for
        # every fused shard (they share their input, so a quantizer ordering by it gives them one).
        self.input_order: torch.Tensor | None = None
        self.packed: PackedInt4 | None = None

    def put(self, start: int, part: Int4Weight) -> None:
        if self.group_size == 0:
            self.group_size = part.group_size
            groups = self.cols // part.group_size
            self.scales = torch.zeros(self.rows, groups, dtype=self.dtype, device=self.device)
            self.zeros = torch.zeros(self.rows, groups, dtype=torch.uint8, device=self.device)
            if part.input_order is not None:
                self.input_order = part.input_order.to(self.device)
        if part.group_size != self.group_size:
            raise ValueError(
                f"fused 4-bit shards with groups of {part.group_size} and {self.group_size} inputs"
            )
        if not _same_order(part.input_order, self.input_order):
            raise ValueError(
                "fused 4-bit shards quantized in different input orders (act order): their product "
                "cannot gather one input for all of them"
            )
        end = start + part.shape[0]
        self.codes[start:end] = part.codes.to(self.device)
        self.scales[start:end] = part.scales.to(self.device, self.dtype)
        self.zeros[start:end] = part.zeros.to(self.device)

    def gather_inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [T, cols] in the order the stored columns multiply them (act order), else as they are."""
        return rows if self.input_order is None else rows.index_select(1, self.input_order)

    def finish(self) -> PackedInt4:
        if self.packed is None:
            self.packed = pack_int4(self.codes, self.scales, self.zeros, self.group_size)
            del self.codes, self.scales, self.zeros
        return self.packed


class Int4LinearMethod(LinearMethod):
    """Weights in `layer.int4` (an Int4Store); `weight` is an empty [0, cols] parameter."""

    def create_weights(
        self, layer: MethodLayer, rows: int, cols: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        setattr(layer, "int4", Int4Store(rows, cols, dtype, device))  # noqa: B010
        layer.weight = nn.Parameter(torch.empty(0, cols, dtype=dtype, device=device), requires_grad=False)
        layer.packed = None
        layer.onednn_weight = None

    def load_rows(self, layer: MethodLayer, name: str, loaded: LoadedWeight, where: RowSlice) -> None:
        if isinstance(loaded, torch.Tensor):
            part = loaded.narrow(0, where.src_start, where.rows).to(store_of(layer).device)
            loaded = quantize_int4_groups(part, default_group_size(part.shape[1]))
            where = RowSlice(where.rows, 0, where.rows, where.dst_start)
        if not isinstance(loaded, Int4Weight):
            raise ValueError(
                f"tensor {name!r} is not a 4-bit or dense weight; the w4a16 method cannot load it"
            )
        store_of(layer).put(where.dst_start, loaded.narrow_rows(where.src_start, where.rows))

    def process_after_loading(self, layer: MethodLayer) -> bool:
        store_of(layer).finish()
        return True

    def apply(self, layer: MethodLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        store = store_of(layer)
        packed = store.finish()
        rows = store.gather_inputs(x.reshape(-1, x.shape[-1]))
        if takes_decode_kernel(rows):
            plan = W4A16_PLANS.plan_for(plan_key(packed, rows.shape[0] == 1))
            out = decode_linear(packed, rows.contiguous(), bias, plan)
        elif x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
            from batchlm.kernels.w4a16_gemm import w4a16_matmul

            out = w4a16_matmul(rows.contiguous(), packed)
            out = out if bias is None else out + bias
        else:
            out = F.linear(rows, dequantize_packed(packed, x.dtype), bias)
        return out.reshape(*x.shape[:-1], packed.out_features)

    def tune_decode(self, layers: Sequence[MethodLayer], dtype: torch.dtype) -> None:
        """Time the decode plans for these layers' (common) shape, one row and 2..16 rows."""
        packs = [store_of(layer).finish() for layer in layers]
        for one_row in (True, False):
            x = torch.randn(
                bucket_rows(one_row), packs[0].in_features, dtype=dtype, device=store_of(layers[0]).device
            )

            def launches(plan: W4A16Plan, x: torch.Tensor = x) -> list[functools.partial[torch.Tensor]]:
                return [
                    functools.partial(decode_linear, store_of(layer).finish(), x, bias_of(layer), plan)
                    for layer in layers
                ]

            W4A16_PLANS.tune(plan_key(packs[0], one_row), launches)

    def embed(self, layer: MethodLayer, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("4-bit weights serve linear layers only; embeddings stay dense")

    def dequantized(self, layer: MethodLayer) -> torch.Tensor:
        """The float32 [rows, cols] weight the codes stand for, in the layer's input order (tests,
        references)."""
        store = store_of(layer)
        values = dequantize_packed(store.finish())
        return values if store.input_order is None else in_input_order(values, store.input_order)


W4A16Plan: TypeAlias = "GemvConfig | W4A16Config"


def w4a16_candidates(key: PlanKey) -> list[W4A16Plan]:
    from batchlm.kernels.w4a16_gemv import candidate_plans

    return candidate_plans(key.one_row, key.group_size)


W4A16_PLANS: PlanTable[W4A16Plan] = PlanTable(w4a16_candidates)


def plan_key(packed: PackedInt4, one_row: bool) -> PlanKey:
    return PlanKey("w4a16", packed.out_features, packed.in_features, one_row, packed.group_size)


def decode_linear(
    packed: PackedInt4, rows: torch.Tensor, bias: torch.Tensor | None, plan: W4A16Plan
) -> torch.Tensor:
    if isinstance(plan, GemvConfig):
        from batchlm.kernels.w4a16_gemv import w4a16_gemv

        return w4a16_gemv(rows, packed, bias, plan)
    from batchlm.kernels.w4a16_gemm import w4a16_matmul

    out = w4a16_matmul(rows, packed, plan)
    return out if bias is None else out + bias


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a.to(b.device), b)


def store_of(layer: MethodLayer) -> Int4Store:
    store = layer.__dict__.get("int4")
    assert isinstance(store, Int4Store), "the layer's weights were not created by the w4a16 method"
    return store


INT4 = Int4LinearMethod()
