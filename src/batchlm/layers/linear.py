"""Linear layers split across tensor-parallel ranks, with loaders that place HF checkpoint shards.

Weights are [out_features, in_features] as in nn.Linear. Column-parallel layers split the output
rows across ranks; row-parallel layers split the input columns and all-reduce the partial sums.
QKVParallelLinear and MergedColumnParallelLinear fuse several HF projections into one matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from batchlm.layers.quantization.base import LoadedWeight, RowSlice, as_dense, narrow_cols
from batchlm.layers.quantization.layer import MethodLayer
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


class LinearLayer(MethodLayer):
    """A linear layer whose weight belongs to its LinearMethod (layers/quantization/)."""

    def pack_for_cpu(self) -> bool:
        """Post-load processing of the (final) weight: for dense float32 CPU weights, the move to the CPU
        GEMM kernel's panel layout; False where nothing changed."""
        return self.process_weights_after_loading()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T (+ bias) through the layer's method."""
        return self.method.apply(self, x, bias)

    def matmul_silu_gated(self, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """silu(gate) * up @ W^T (+ bias) in one product where the method can (see LinearMethod)."""
        return self.method.apply_silu_gated(self, gate_up, bias)


class ColumnParallelLinear(LinearLayer):
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
        self.init_weight(self.output_size_per_rank, input_size)
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
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """Copy this rank's part of the HF tensor `name` into `param_name` (weight: through the method)."""
        where = self.row_slice(shard)
        if param_name == "weight":
            check_shape(name, (where.full_rows, self.input_size), loaded.shape)
            self.method.load_rows(self, name, loaded, where)
            return
        bias = self._bias(name, param_name)
        check_shape(name, (where.full_rows,), loaded.shape)
        part = as_dense(loaded, bias.dtype).narrow(0, where.src_start, where.rows)
        with torch.no_grad():
            bias.narrow(0, where.dst_start, where.rows).copy_(part)

    def _bias(self, name: str, param_name: str) -> nn.Parameter:
        param = getattr(self, param_name, None) if param_name == "bias" else None
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
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"num_key_value_heads ({num_kv_heads}) does not divide the tensor-parallel size "
                    f"{tp.size}, so the KV heads cannot be shared out among the ranks"
                )
            replicas = tp.size // num_kv_heads
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


class RowParallelLinear(LinearLayer):
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
        self.init_weight(output_size, self.input_size_per_rank)
        self.bias = nn.Parameter(torch.zeros(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, input_size_per_rank] -> [T, output_size]
        if self.tp.is_single:
            return self.matmul(x, self.bias)
        return self._sum_ranks(self.matmul(x, None))

    def forward_silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """forward(silu(gate) * up) for gate_up [T, 2 * input_size_per_rank] ([gate | up]), with the
        activation made inside the product; None where the weight's method cannot (see LinearMethod)."""
        if self.tp.is_single:
            return self.matmul_silu_gated(gate_up, self.bias)
        partial = self.matmul_silu_gated(gate_up, None)
        return None if partial is None else self._sum_ranks(partial)

    def _sum_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """This rank's product summed across ranks, the bias added once, after the sum."""
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias

    def load_weight(
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """Copy this rank's columns of the HF weight (through the method; the whole bias) into `param_name`."""
        if shard is not None:
            raise ValueError(f"RowParallelLinear is not fused; got shard {shard!r} for {name!r}")
        if param_name == "weight":
            check_shape(name, (self.output_size, self.input_size), loaded.shape)
            start = self.tp.rank * self.input_size_per_rank
            part = narrow_cols(loaded, start, self.input_size_per_rank)
            self.method.load_rows(self, name, part, RowSlice(self.output_size, 0, self.output_size, 0))
        elif param_name == "bias" and self.bias is not None:
            check_shape(name, (self.output_size,), loaded.shape)
            with torch.no_grad():
                self.bias.copy_(as_dense(loaded, self.bias.dtype))
        else:
            raise ValueError(f"unexpected checkpoint tensor {name!r}: the layer has no {param_name}")

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, tp={self.tp.size}, bias={self.bias is not None}, "
            f"packed={self.packed is not None}"
        )


def pack_linears_for_cpu(model: nn.Module) -> int:
    """Post-load processing of every linear (dense float32 CPU weights: packing for the CPU GEMM
    kernel); returns how many changed form."""
    return sum(1 for module in model.modules() if isinstance(module, LinearLayer) and module.pack_for_cpu())
