"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.kernels.cpu_gemm import PackedWeight, can_pack, pack_weight, packed_linear
from batchlm.layers.linear import check_shape
from batchlm.layers.onednn import onednn_linear, to_onednn_weight
from batchlm.parallel.group import SINGLE_RANK, TensorParallelGroup


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous block of ceil(vocab / size) rows (the last block zero-padded);
    a rank embeds the ids it owns, zeros the others, and an all-reduce assembles the result."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp = tp
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows this rank owns that are real vocabulary (the rest is padding).
        self.num_real_rows = max(0, min(vocab_size - self.vocab_start, self.rows_per_rank))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp.is_single:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.num_real_rows)
        embedded = F.embedding(torch.where(owned, local, 0), self.weight)
        embedded = embedded * owned.unsqueeze(-1).to(embedded.dtype)
        return self.tp.all_reduce(embedded)

    def load_weight(
        self, name: str, param_name: str, loaded: torch.Tensor, shard: str | int | None = None
    ) -> None:
        """Copy this rank's rows of the HF [vocab, hidden] tensor; padding rows become zero."""
        if param_name != "weight" or shard is not None:
            raise ValueError(f"unexpected checkpoint tensor {name!r} for an embedding")
        check_shape(name, (self.vocab_size, self.hidden_size), loaded.shape)
        with torch.no_grad():
            self.weight.zero_()
            rows = loaded.narrow(0, self.vocab_start, self.num_real_rows)
            self.weight.narrow(0, 0, self.num_real_rows).copy_(rows)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, hidden={self.hidden_size}, tp={self.tp.size}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocab logits, vocabulary split like the embedding so the two
    can share one weight when the checkpoint ties them.

    On the CPU in float32, `use_cpu_matmul()` (called once the weights are final) routes the logits
    matmul through the CPU GEMM kernel's packed copy of the weight, or where that kernel is unavailable
    a oneDNN copy: both faster for decode batches than torch's matmul, at the cost of that copy.
    """

    # Packed or oneDNN copy of `weight` (not parameters: checkpoints and state dicts never see them).
    packed: PackedWeight | None = None
    onednn_weight: torch.Tensor | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings)."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError("cannot tie the LM head to an embedding of a different shape")
        self.weight = embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied with compute_logits, not called")

    def use_cpu_matmul(self) -> bool:
        """Copy the (final) weight for the CPU kernel or oneDNN; False where neither applies."""
        weight = self.weight
        if can_pack(weight):
            self.packed = pack_weight(weight)
            return True
        self.onednn_weight = to_onednn_weight(weight)
        return self.onednn_weight is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> logits [N, vocab] float32 (padding columns of the last rank dropped)
        if self.packed is not None:
            logits = packed_linear(hidden, self.packed)
        elif self.onednn_weight is not None and hidden.dim() == 2 and hidden.shape[0] > 0:
            logits = onednn_linear(hidden.float(), self.onednn_weight)
        else:
            logits = F.linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size].float()


def use_cpu_lm_head(model: nn.Module) -> bool:
    """Give the model's LM head its CPU matmul copy (float32 CPU models; see kernels/cpu_gemm.py and
    layers/onednn.py). Called once loading (and any LoRA merge) is done; returns whether it took it."""
    heads = [module for module in model.modules() if isinstance(module, ParallelLMHead)]
    return all(head.use_cpu_matmul() for head in heads) and bool(heads)
