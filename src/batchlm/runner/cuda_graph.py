"""CUDA graphs for pure-decode steps: one graph per padded batch size, replayed with static buffers.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch cost.
Graphs are captured for batch sizes 1, 2, 4, 8, then every 16 up to the max (at most MAX_CAPTURE_BATCH); a
batch is padded to the next captured size, and a larger one runs eagerly. Padding rows get seq_len 0 and
slot -1, which the Triton backend skips.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.models.base import CausalLM
from batchlm.startup_log import log_phase

logger = logging.getLogger(__name__)


# The largest decode batch captured (vLLM's default cap too): a batch that large is bound by its
# matmuls, where replaying a graph saves little, while every 16 rows more cost one more capture at
# start-up and the static block tables a row of max_model_len / block_size entries each. A
# --max-num-seqs of 50,000 would otherwise capture 3,129 graphs over tables of 50,000 rows.
MAX_CAPTURE_BATCH = 512
# Verify steps of more rows than this (and than max_num_seqs) run eagerly: capturing graphs for every
# batch up to max_num_seqs x (1 + drafts) would add a graph per 16 rows to start-up.
MAX_VERIFY_GRAPH_ROWS = 256


def graph_batch_limit(max_num_seqs: int, most_verify_rows: int = 0) -> int:
    """The largest decode batch to capture: every batch the scheduler can send (max_num_seqs decodes,
    or a verify step's rows up to MAX_VERIFY_GRAPH_ROWS), at most MAX_CAPTURE_BATCH."""
    return min(max(max_num_seqs, min(most_verify_rows, MAX_VERIFY_GRAPH_ROWS)), MAX_CAPTURE_BATCH)


def capture_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass
class _StaticBuffers:
    """Inputs every captured graph reads (slices of the largest size)."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int32
    query_start_loc: torch.Tensor  # [B + 1] int32 (0, 1, 2, ...): one query per row
    block_tables: torch.Tensor  # [B, max_blocks] int32


class DecodeGraphs:
    """Captures model forward + logits for decode batches; `run` pads, copies inputs and replays."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        attn: AttentionBackend,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.attn = attn
        self.max_blocks = max_blocks_per_seq
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        b = self.max_batch
        self.buffers = _StaticBuffers(
            input_ids=torch.zeros(b, dtype=torch.long, device=device),
            positions=torch.zeros(b, dtype=torch.long, device=device),
            slot_mapping=torch.full((b,), -1, dtype=torch.long, device=device),
            seq_lens=torch.zeros(b, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device),
            block_tables=torch.zeros((b, max_blocks_per_seq), dtype=torch.int32, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool: Any = None
        # Wall time of each capture (warm-up run included), for the start-up log and benchmarks.
        self.capture_seconds: dict[int, float] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        buf = self.buffers
        return AttentionMetadata(
            slot_mapping=buf.slot_mapping[:size],
            query_start_loc=buf.query_start_loc[: size + 1],
            seq_lens=buf.seq_lens[:size],
            block_tables=buf.block_tables[:size],
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[1] * size,
            max_query_len=1,
            max_seq_len=self.max_blocks,  # unused by the decode kernel; a static stand-in
            num_decodes=size,
        )

    def _forward(self, size: int) -> torch.Tensor:
        buf = self.buffers
        hidden = self.model(
            buf.input_ids[:size], buf.positions[:size], self.kv_caches, self._meta(size), self.attn
        )
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        # Largest first, so smaller graphs reuse its memory pool.
        for size in reversed(self.sizes):
            size_started = time.perf_counter()
            self._capture_one(size)
            self.capture_seconds[size] = time.perf_counter() - size_started
            logger.debug(
                "CUDA graph for decode batch %d captured in %.3f s", size, self.capture_seconds[size]
            )
        torch.cuda.synchronize()
        slowest = max(self.capture_seconds, key=self.capture_seconds.__getitem__)
        log_phase(
            logger,
            "CUDA graphs",
            time.perf_counter() - started,
            f"{len(self.graphs)} decode batch sizes up to {self.max_batch}; slowest: batch {slowest} "
            f"in {self.capture_seconds[slowest]:.2f} s",
        )

    def _capture_one(self, size: int) -> None:
        # One eager run first: Triton compiles and lazy allocations must happen outside the graph.
        self._forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[size] = self._forward(size)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[size] = graph

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.num_decodes == meta.num_requests
            and meta.num_requests <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [num_requests, vocab] of a pure-decode batch."""
        count = meta.num_requests
        size = next(s for s in self.sizes if s >= count)
        buf = self.buffers
        buf.input_ids[:count].copy_(input_ids, non_blocking=True)
        buf.positions[:count].copy_(positions, non_blocking=True)
        buf.slot_mapping[:count].copy_(meta.slot_mapping, non_blocking=True)
        buf.seq_lens[:count].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        buf.block_tables[:count, :width].copy_(meta.block_tables, non_blocking=True)
        if size > count:
            buf.slot_mapping[count:size].fill_(-1)
            buf.seq_lens[count:size].fill_(0)
        self.graphs[size].replay()
        return self.outputs[size][:count]
