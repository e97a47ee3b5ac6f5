"""The interface every model family implements for the runner and the loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from batchlm.attention.backend import AttentionBackend, AttentionMetadata
from batchlm.layers.embedding import ParallelLMHead
from batchlm.layers.quantization.base import LoadedWeight
from batchlm.models.model_config import ModelConfig, read_model_config

# (fused module, HF module it absorbs, shard id): HF checkpoints store q/k/v and gate/up separately;
# our layers fuse them into one matmul each.
StackedParam = tuple[str, str, str | int]


class CausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    Parameter names follow the HF checkpoint, except the fused modules listed in `stacked_params`.
    A family's class is built as `cls(cls.read_config(hf_config), tp)`.
    """

    config: ModelConfig
    # The decoder stack (embedding, layers, final norm; HF's `model.` prefix) and the LM head, which
    # a family builds in its __init__.
    model: nn.Module
    lm_head: ParallelLMHead
    stacked_params: ClassVar[tuple[StackedParam, ...]] = ()
    # Checkpoint tensors that are expected but carry nothing we need (e.g. cached RoPE buffers).
    ignored_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    # Whether the family decodes a checkpoint's MXFP4 expert pairs (quant_method mxfp4: gpt-oss's).
    loads_mxfp4_experts: ClassVar[bool] = False

    @classmethod
    def read_config(cls, hf_config: Any) -> ModelConfig:
        """The typed config this family is built from (families with extra fields override this)."""
        return read_model_config(hf_config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # one [2, num_blocks, block_size, H_kv, D] per layer
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        hidden: torch.Tensor = self.model(input_ids, positions, kv_caches, meta, attn)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in the model's dtype (a family that caps or scales its logits
        overrides this)."""
        return self.lm_head.compute_logits(hidden)

    @property
    def tie_word_embeddings(self) -> bool:
        return self.config.tie_word_embeddings

    def checkpoint_tensors(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterable[tuple[str, LoadedWeight]]:
        """The checkpoint's (name, tensor) pairs as this model names them; a family whose checkpoints
        fuse or nest tensors differently renames or splits them here."""
        return weights

    def tensors_loaded_elsewhere(self) -> set[str]:
        """Parameter names that `checkpoint_tensors` loads itself (a family stacking its experts),
        which the generic loader must not call missing."""
        return set()

    def check_loaded_elsewhere(self) -> None:
        """After loading: raise ValueError naming what `checkpoint_tensors` expected and never saw."""
