"""Linear layers split across tensor-parallel ranks, with loaders that place HF checkpoint shards.

Weights are [out_features, in_features] as in nn.Linear. Column-parallel layers split the output
rows across ranks; row-parallel layers split the input columns and all-reduce the partial sums.
QKVParallelLinear and MergedColumnParallelLinear fuse several HF projections into one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_gemm import PackedWeight, can_pack, pack_weight, packed_linear
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


class WeightShapeError(ValueError):
    """A checkpoint tensor whose shape does not match what the model expects."""


def check_shape(name: str, expected: tuple[int, ...], got: torch.Size) -> None:
    if tuple(got) != expected:
        raise WeightShapeError(
            f"shape mismatch for checkpoint tensor {name!r}: the model expects {list(expected)}, "
            f"the checkpoint has {list(got)}"
        )


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts != 0:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {parts}")
    return total // parts


@dataclass(frozen=True)
class RowSlice:
    """Where one HF tensor's rows go: rows [src_start, src_start + rows) of a tensor with
    `full_rows` rows are copied to rows [dst_start, dst_start + rows) of this rank's parameter."""

    full_rows: int
    src_start: int
    rows: int
    dst_start: int


class CpuPackable(nn.Module):
    """A linear layer that can move its float32 CPU weight to the CPU GEMM kernel's panel layout.

    `pack_for_cpu()` is called once the weights are final (after loading and any LoRA merge). The
    dense `weight` is then released (left as an empty [0, in] tensor) so the model's memory does not
    double; every matmul of the layer goes through the kernel from then on.
    """

    weight: nn.Parameter
    # The packed weight once pack_for_cpu() took it (not a parameter: state dicts never see it).
    packed: PackedWeight | None = None

    def pack_for_cpu(self) -> bool:
        """Pack the weight for the CPU kernel; False (nothing changed) where that path does not apply."""
        weight = self.weight
        if not can_pack(weight):
            return False
        self.packed = pack_weight(weight)
        self.weight = nn.Parameter(weight.new_empty(0, weight.shape[1]), requires_grad=False)
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias) through whichever form the weight is in."""
        if self.packed is not None:
            return packed_linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(CpuPackable):
    """y = x W^T + b with W's output rows split across ranks; each rank returns its slice of y
    (or, with gather_output, the whole y)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
        gather_output: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp
        self.gather_output = gather_output
        self.output_size_per_rank = self._rows_per_rank()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(self.output_size_per_rank), requires_grad=False) if bias else None
        )

    def _rows_per_rank(self) -> int:
        return _divide(self.output_size, self.tp.size, "output size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, input_size] -> [T, output_size_per_rank] (or [T, output_size] when gathered)
        y = self.matmul(x, self.bias)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y

    def row_slice(self, shard: str | int | None) -> RowSlice:
        """This rank's rows of the HF tensor for `shard` (None: the layer is not fused)."""
        if shard is not None:
            raise ValueError(f"{type(self).__name__} is not fused; got shard {shard!r}")
        per_rank = self.output_size_per_rank
        return RowSlice(self.output_size, self.tp.rank * per_rank, per_rank, 0)

    def load_weight(
        self, name: str, param_name: str, loaded: torch.Tensor, shard: str | int | None = None
    ) -> None:
        """Copy this rank's part of the HF tensor `name` into parameter `param_name` (weight or bias)."""
        where = self.row_slice(shard)
        param = self._param(name, param_name)
        expected = (where.full_rows, self.input_size) if param_name == "weight" else (where.full_rows,)
        check_shape(name, expected, loaded.shape)
        part = loaded.narrow(0, where.src_start, where.rows)
        with torch.no_grad():
            param.narrow(0, where.dst_start, where.rows).copy_(part)

    def _param(self, name: str, param_name: str) -> nn.Parameter:
        param = getattr(self, param_name, None)
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the layer has no {param_name}")
        return param

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, bias={self.bias is not None}, "
            f"packed={self.packed is not None}"
        )


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul (e.g. gate and
    up); each rank holds its slice of every projection, concatenated in order."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def _rows_per_rank(self) -> int:
        return sum(_divide(size, self.tp.size, "output size") for size in self.output_sizes)

    def row_slice(self, shard: str | int | None) -> RowSlice:
        if not isinstance(shard, int) or not 0 <= shard < len(self.output_sizes):
            raise ValueError(f"shard must be an index below {len(self.output_sizes)}, got {shard!r}")
        per_rank = [size // self.tp.size for size in self.output_sizes]
        full = self.output_sizes[shard]
        return RowSlice(full, self.tp.rank * per_rank[shard], per_rank[shard], sum(per_rank[:shard]))


class QKVParallelLinear(ColumnParallelLinear):
    """The q, k and v projections fused into one matmul: output [q | k | v] per rank.

    Query heads are split across ranks. KV heads are split too when there are at least as many as
    ranks; otherwise each KV head is replicated on size / num_kv_heads consecutive ranks, which are
    exactly the ranks holding the query heads of its group.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = _divide(num_kv_heads, tp.size, "num_key_value_heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            replicas = _divide(tp.size, num_kv_heads, "tensor-parallel size over num_key_value_heads")
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank // replicas
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, tp)

    def _rows_per_rank(self) -> int:
        return self.q_size + 2 * self.kv_size

    def row_slice(self, shard: str | int | None) -> RowSlice:
        d = self.head_dim
        if shard == "q":
            return RowSlice(self.total_num_heads * d, self.tp.rank * self.q_size, self.q_size, 0)
        kv_full = self.total_num_kv_heads * d
        if shard == "k":
            return RowSlice(kv_full, self.kv_head_start * d, self.kv_size, self.q_size)
        if shard == "v":
            return RowSlice(kv_full, self.kv_head_start * d, self.kv_size, self.q_size + self.kv_size)
        raise ValueError(f"shard must be 'q', 'k' or 'v', got {shard!r}")

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # qkv: [T, q_size + 2 * kv_size] -> q [T, q_size], k [T, kv_size], v [T, kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v


class RowParallelLinear(CpuPackable):
    """y = x W^T + b with W's input columns split across ranks: each rank multiplies its slice of x
    and the partial results are summed with an all-reduce (the bias is added once, after it)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp
        self.input_size_per_rank = _divide(input_size, tp.size, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, input_size_per_rank] -> [T, output_size]
        if self.tp.is_single:
            return self.matmul(x, self.bias)
        y = self.tp.all_reduce(self.matmul(x, None))
        return y if self.bias is None else y + self.bias

    def load_weight(
        self, name: str, param_name: str, loaded: torch.Tensor, shard: str | int | None = None
    ) -> None:
        """Copy this rank's columns of the HF weight (the whole bias) into `param_name`."""
        if shard is not None:
            raise ValueError(f"RowParallelLinear is not fused; got shard {shard!r} for {name!r}")
        with torch.no_grad():
            if param_name == "weight":
                check_shape(name, (self.output_size, self.input_size), loaded.shape)
                start = self.tp.rank * self.input_size_per_rank
                self.weight.copy_(loaded.narrow(1, start, self.input_size_per_rank))
            elif param_name == "bias" and self.bias is not None:
                check_shape(name, (self.output_size,), loaded.shape)
                self.bias.copy_(loaded)
            else:
                raise ValueError(f"unexpected checkpoint tensor {name!r}: the layer has no {param_name}")

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, bias={self.bias is not None}, "
            f"packed={self.packed is not None}"
        )


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Pack every packable linear of a float32 CPU model for the CPU GEMM kernel; returns how many took it."""
    return sum(1 for module in model.modules() if isinstance(module, CpuPackable) and module.pack_for_cpu())
