"""A short chunk after cached context (a speculative verify chunk) attends row by row through the CPU
decode kernel: each row's output is bit for bit the output of decoding that token on its own."""

from __future__ import annotations

import pytest
import torch

from batchlm.attention.backend import AttentionSpec
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.kernels.cpu_decode_attention import decode_library
from models_harness import Chunk, build_step

BLOCK = 4


@pytest.mark.skipif(decode_library() is None, reason="no AVX2 CPU or C compiler here")
def test_verify_rows_equal_one_decode_each() -> None:
    gen = torch.Generator().manual_seed(7)
    blocks = [5, 2, 9, 0, 7]
    context, rows = 11, 5  # positions 11..15 are computed in one chunk
    cache = torch.randn(2, 12, BLOCK, 3, 64, generator=gen)
    query = torch.randn(rows, 9, 64, generator=gen)
    key = torch.randn(rows, 3, 64, generator=gen)
    value = torch.randn(rows, 3, 64, generator=gen)
    # A decode first in the step, as in a real batch.
    other_q, other_k, other_v = (torch.randn(1, h, 64, generator=gen) for h in (9, 3, 3))
    _, _, meta = build_step([Chunk([0], 6, [1, 3]), Chunk([0] * rows, context, blocks)], BLOCK)
    together = TorchAttentionBackend().forward(
        torch.cat([other_q, query]),
        torch.cat([other_k, key]),
        torch.cat([other_v, value]),
        cache.clone(),
        meta,
        AttentionSpec(0.125),
    )[1:]
    one_by_one = cache.clone()
    for row in range(rows):
        _, _, step = build_step([Chunk([0], context + row, blocks)], BLOCK)
        assert step.num_decodes == 1
        out = TorchAttentionBackend().forward(
            query[row : row + 1],
            key[row : row + 1],
            value[row : row + 1],
            one_by_one,
            step,
            AttentionSpec(0.125),
        )
        assert torch.equal(out[0], together[row]), row


def test_a_fresh_prompt_still_takes_the_prefill_path() -> None:
    from batchlm.attention.torch_backend import _short_chunk_after_context

    _, _, meta = build_step(
        [Chunk([0] * 5, 0, [1, 2]), Chunk([0] * 3, 8, [4, 5, 6]), Chunk([0] * 40, 8, list(range(12)))], BLOCK
    )
    assert [_short_chunk_after_context(meta, r) for r in range(3)] == [False, True, False]
