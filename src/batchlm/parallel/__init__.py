"""Tensor parallelism: the process group the parallel layers reduce and gather over."""

from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup, shard_range

__all__ = ["SINGLE_RANK", "TensorParallelGroup", "shard_range"]
