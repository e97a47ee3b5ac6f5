"""The attention-backend interface and the per-step metadata every backend reads.

KV-cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_dim];
index 0 holds keys, 1 values. Token `i` of a request lives in block `block_table[i // block_size]`
at offset `i % block_size`, i.e. at flat slot `block_id * block_size + offset`.

Batch layout ("varlen"): the new tokens of all scheduled requests are concatenated, decodes first;
request b owns query rows query_start_loc[b] : query_start_loc[b + 1]. A query at position p attends
to the request's cached and new keys at positions <= p (and > p - window on a sliding-window layer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends: fixed for the model's life, read by every backend and kernel."""

    # Multiplies q.k before the softmax.
    scale: float
    # A query at position p sees keys at positions p - window + 1 .. p; None: the whole context.
    sliding_window: int | None = None
    # Scores become cap * tanh(scores / cap) before the softmax (Gemma 2); None: no cap.
    logit_softcap: float | None = None
    # Each head has a learned sink logit that joins its softmax as a key without a value, so a query may
    # attend to nothing (gpt-oss); the layer passes them to forward as `sinks`.
    sinks: bool = False


@dataclass
class AttentionMetadata:
    """Built once per step by the runner; shared by every layer."""

    # [T] int64: flat KV slot where each new token's key/value is written.
    slot_mapping: torch.Tensor
    # [B + 1] int32: cumulative query lengths.
    query_start_loc: torch.Tensor
    # [B] int32: context length per request after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [B, max_blocks_per_seq] int32: block tables, padded with 0.
    block_tables: torch.Tensor
    # Host copies (no device sync needed to read them).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    # The first num_decodes requests have exactly one query token each.
    num_decodes: int

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]


class QueryKeyRotation(Protocol):
    """A layer's rotary embedding as a backend sees it (layers/rotary.RotaryEmbedding)."""

    def rotate(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, key) rotated by their positions (possibly in place)."""
        ...

    def fusable_table(self, query: torch.Tensor) -> torch.Tensor | None:
        """The [max_position, head_dim] float32 cos | sin table when a kernel may rotate these queries
        and their keys itself (every dimension turns, "rotate half" layout, on a GPU); else None."""
        ...


class AttentionBackend(ABC):
    """Writes the new keys/values into the paged cache, then attends over each request's context."""

    name: str = "abstract"
    # Most of a decode row's last context tokens a step writes before attending (1; 1 + the drafts where
    # verify chunks run as decode rows), set once by the engine before any CUDA graph is captured;
    # None: unknown. A backend that reads the cache only after the write ignores it.
    newest_decode_tokens: int | None = None

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        spec: AttentionSpec,
        sinks: torch.Tensor | None = None,  # [num_heads] float32 where spec.sinks
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Causal attention of each new token over its request's context (its window, if any)."""

    def forward_rotating(
        self,
        positions: torch.Tensor,  # [T]
        rotation: QueryKeyRotation,
        query: torch.Tensor,  # [T, num_heads, head_dim], not yet rotated
        key: torch.Tensor,  # [T, num_kv_heads, head_dim], not yet rotated
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        spec: AttentionSpec,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward() on queries and keys before RoPE: rotated here, then attended. A backend may fold
        the rotation into its cache write (query and key are then left as the backend chooses)."""
        query, key = rotation.rotate(positions, query, key)
        return self.forward(query, key, value, kv_cache, meta, spec, sinks)

    def warm_up(
        self,
        kv_cache: torch.Tensor,
        num_heads: int,
        max_blocks_per_seq: int,
        specs: Sequence[AttentionSpec] = (),
        query_dtype: torch.dtype | None = None,
    ) -> None:
        """Compile, at start-up, every kernel variant serving can launch for layers attending as
        `specs` (none for backends without JIT kernels). `kv_cache` is read only; `query_dtype` is
        the model's (None: the cache's)."""
        return None


def check_sinks(spec: AttentionSpec, sinks: torch.Tensor | None, num_heads: int) -> None:
    """A layer passes sink logits exactly where its spec says it has them, one per query head."""
    if spec.sinks != (sinks is not None):
        raise ValueError(
            f"attention sinks: the layer's spec says {spec.sinks}, the call passed {sinks is not None}"
        )
    if sinks is not None and sinks.shape != (num_heads,):
        raise ValueError(f"attention sinks of shape {tuple(sinks.shape)} for {num_heads} query heads")
