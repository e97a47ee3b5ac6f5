"""Vocab-parallel embedding and LM head: each rank's rows, padding, and the gathered result."""

from __future__ import annotations

import torch

from batchlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchlm.parallel.group import TensorParallelGroup
from models_harness import run_ranks, thread_groups

VOCAB, HIDDEN = 11, 4
TABLE = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


def test_single_rank_embedding_and_logits() -> None:
    embed = VocabParallelEmbedding(VOCAB, HIDDEN)
    embed.load_weight("embed", "weight", TABLE)
    ids = torch.tensor([0, 10, 3, 3])
    torch.testing.assert_close(embed(ids), TABLE[ids])
    head = ParallelLMHead(VOCAB, HIDDEN)
    head.load_weight("lm_head", "weight", TABLE)
    hidden = torch.randn(2, HIDDEN, dtype=torch.float64).float()
    logits = head.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits, hidden @ TABLE.T)


def test_ranks_own_contiguous_rows_and_the_last_is_zero_padded() -> None:
    # 11 rows over 3 ranks: 4 + 4 + 3 real rows, one padding row on rank 2.
    last = VocabParallelEmbedding(VOCAB, HIDDEN, TensorParallelGroup(2, 3))
    last.load_weight("embed", "weight", TABLE)
    assert last.weight.shape == (4, HIDDEN) and last.num_real_rows == 3
    torch.testing.assert_close(last.weight[:3], TABLE[8:])
    assert torch.count_nonzero(last.weight[3]) == 0


def test_parallel_embedding_and_logits_match_single_rank() -> None:
    groups = thread_groups(3)
    embeds = [VocabParallelEmbedding(VOCAB, HIDDEN, group) for group in groups]
    heads = [ParallelLMHead(VOCAB, HIDDEN, group) for group in groups]
    for embed, head in zip(embeds, heads, strict=True):
        embed.load_weight("embed", "weight", TABLE)
        head.tie_to(embed)
    ids = torch.tensor([0, 4, 7, 8, 10, 3])

    def rank_step(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = embeds[rank](ids)
        return hidden, heads[rank].compute_logits(hidden)

    for hidden, logits in run_ranks(rank_step, 3):
        torch.testing.assert_close(hidden, TABLE[ids])
        assert logits.shape == (len(ids), VOCAB)
        torch.testing.assert_close(logits, TABLE[ids] @ TABLE.T)


def test_tied_head_shares_the_embedding_parameter() -> None:
    embed = VocabParallelEmbedding(VOCAB, HIDDEN)
    head = ParallelLMHead(VOCAB, HIDDEN)
    head.tie_to(embed)
    embed.load_weight("embed", "weight", TABLE)
    assert head.weight is embed.weight
    torch.testing.assert_close(head.compute_logits(TABLE[:2]), TABLE[:2] @ TABLE.T)
