"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from batchlm.layers.linear import check_shape
from batchlm.layers.quantization.base import LinearMethod, LoadedWeight, RowSlice
from batchlm.layers.quantization.layer import MethodLayer
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


class VocabParallelEmbedding(MethodLayer):
    """Each rank holds a contiguous block of ceil(vocab / size) rows (the last block zero-padded);
    a rank embeds the ids it owns, zeros the others, and an all-reduce assembles the result.

    Rows are looked up through the layer's method, so a quantized table can stay quantized."""

    role: ClassVar[str] = "embedding"

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp = tp
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows this rank owns that are real vocabulary (the rest is padding).
        self.num_real_rows = max(0, min(vocab_size - self.vocab_start, self.rows_per_rank))
        self.init_weight(self.rows_per_rank, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp.is_single:
            return self.method.embed(self, input_ids)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.num_real_rows)
        embedded = self.method.embed(self, torch.where(owned, local, 0))
        embedded = embedded * owned.unsqueeze(-1).to(embedded.dtype)
        return self.tp.all_reduce(embedded)

    def load_weight(
        self, name: str, param_name: str, loaded: LoadedWeight, shard: str | int | None = None
    ) -> None:
        """Copy this rank's rows of the HF [vocab, hidden] tensor through the method (the padding rows
        of a dense weight become zero)."""
        if param_name != "weight" or shard is not None:
            raise ValueError(f"unexpected checkpoint tensor {name!r} for an embedding")
        check_shape(name, (self.vocab_size, self.hidden_size), loaded.shape)
        dense = getattr(self, "weight", None)
        if isinstance(dense, torch.Tensor) and dense.shape[0] == self.rows_per_rank:
            with torch.no_grad():
                dense.zero_()
        where = RowSlice(self.vocab_size, self.vocab_start, self.num_real_rows, 0)
        self.method.load_rows(self, name, loaded, where)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, hidden={self.hidden_size}, tp={self.tp.size}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab logits, vocabulary split like the embedding so the two
    can share one weight when the checkpoint ties them.

    The logits matmul goes through the layer's method. On the CPU in float32 the dense method's
    post-load step (`use_cpu_matmul()`, once the weights are final) gives it the CPU GEMM kernel's
    packed copy of the weight, or where that kernel is unavailable a oneDNN copy: both faster for
    decode batches than torch's matmul, at the cost of that copy (the dense weight stays, since a tied
    embedding looks rows up in it).
    """

    role: ClassVar[str] = "lm_head"
    keeps_dense_weight: ClassVar[bool] = True
    onednn_fallback: ClassVar[bool] = True
    # The embedding whose method and storage this head shares (tie_word_embeddings), in a tuple so
    # that nn.Module does not register it as a submodule (its weight would show twice in state dicts).
    _tied: tuple[VocabParallelEmbedding, ...] = ()

    @property
    def tied_embedding(self) -> VocabParallelEmbedding | None:
        return self._tied[0] if self._tied else None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings), also after the embedding's method changes."""
        if (embedding.weight_rows, embedding.weight_cols) != (self.weight_rows, self.weight_cols):
            raise ValueError("cannot tie the LM head to an embedding of a different shape")
        self._tied = (embedding,)
        self.method = embedding.method
        embedding.method.share_weights(embedding, self)

    def set_method(self, method: LinearMethod) -> None:
        if self.tied_embedding is not None:
            raise ValueError("a tied LM head follows its embedding's method; set the embedding's")
        super().set_method(method)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied with compute_logits, not called")

    def use_cpu_matmul(self) -> bool:
        """Post-load processing of the (final) weight (dense float32 CPU: a packed or oneDNN copy);
        False where nothing changed."""
        return self.process_weights_after_loading()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits [N, vocab] in the model's dtype (padding columns of the last
        # rank dropped); the sampler widens them only where it must.
        logits = self.method.apply(self, hidden, None)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]


def use_cpu_lm_head(model: nn.Module) -> bool:
    """Give the model's LM head its CPU matmul copy (float32 CPU models; see kernels/cpu_gemm.py and
    layers/onednn.py). Called once loading (and any LoRA merge) is done; returns whether it took it."""
    heads = [module for module in model.modules() if isinstance(module, ParallelLMHead)]
    return all(head.use_cpu_matmul() for head in heads) and bool(heads)
