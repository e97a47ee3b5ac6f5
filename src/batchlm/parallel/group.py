"""The tensor-parallel process group that parallel layers talk to (a no-op when there is one rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in a tensor-parallel group, plus the two collectives the layers need.

    The default (rank 0 of 1) never touches torch.distributed, so single-device code pays nothing.
    Layers receive the group explicitly; there is no global "current group".
    """

    # Index of this process in the group, 0 <= rank < size.
    rank: int = 0
    # Number of processes the model is split across.
    size: int = 1
    # torch.distributed ProcessGroup; None means the default (world) group.
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} for group size {self.size}")

    @classmethod
    def from_distributed(cls, process_group: Any = None) -> TensorParallelGroup:
        """The group of an initialised torch.distributed job (the world group by default)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        return cls(dist.get_rank(process_group), dist.get_world_size(process_group), process_group)

    @property
    def is_single(self) -> bool:
        return self.size == 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks (in place where possible) and return the sum."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.process_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `tensor` (same shape on each) along `dim`, in rank order."""
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.process_group)
        return torch.cat(parts, dim=dim)


SINGLE_RANK = TensorParallelGroup()


def shard_range(total: int, tp: TensorParallelGroup) -> tuple[int, int]:
    """[start, end) of this rank's equal slice of `total` items; `total` must divide evenly."""
    if total % tp.size != 0:
        raise ValueError(f"{total} is not divisible by the tensor-parallel size {tp.size}")
    per_rank = total // tp.size
    return tp.rank * per_rank, (tp.rank + 1) * per_rank
