"""The Triton backend on a verify step laid out as decode rows (runner/decode_rows.py), the layout the
decode CUDA graphs replay, against the same step laid out as chunks (decode kernel + prefill kernel):
the same attention output and the same cache writes, on blocks crossed by the verify chunk, with and
without a sliding window.

GPU only (marked `gpu`); TRITON_INTERPRET=1 runs it on the CPU through Triton's interpreter (fp16).
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, HALF, HALF_ATOL, require_cuda_or_interpreter

pytestmark = pytest.mark.gpu
require_cuda_or_interpreter()

from batchlm.attention.backend import AttentionSpec  # noqa: E402
from batchlm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from batchlm.core.step_io import ScheduledChunk, SchedulerOutput  # noqa: E402
from batchlm.runner.inputs import StepInputBuilder, StepInputs  # noqa: E402

BLOCK, KV_HEADS, HEADS, HEAD_DIM = 16, 2, 8, 64

# A decode after 40 tokens, a verify chunk of 1 + 4 tokens after 29 (it crosses into a third block),
# and a second verify chunk of 1 + 2 after 5 tokens.
STEP = SchedulerOutput(
    (
        ScheduledChunk("a", (1,), 40, (7, 2, 9), True),
        ScheduledChunk("b", (2, 3, 4, 5, 6), 29, (4, 0, 11), True, 4),
        ScheduledChunk("c", (7, 8, 9), 5, (5,), True, 2),
    ),
    (),
    frozenset(),
)


def _inputs(max_decode_rows: int) -> StepInputs:
    builder = StepInputBuilder(BLOCK, DEVICE)
    builder.max_decode_rows = max_decode_rows
    return builder.build(STEP)


@pytest.mark.parametrize("window", [None, 8])
def test_decode_rows_attend_as_the_chunks_do(window: int | None) -> None:
    gen = torch.Generator().manual_seed(5)
    chunked, rows = _inputs(0), _inputs(16)
    assert (chunked.meta.num_decodes, rows.meta.num_decodes) == (1, 9)
    tokens = rows.meta.num_tokens
    query, key, value = (
        torch.randn(tokens, heads, HEAD_DIM, generator=gen).to(DEVICE, HALF)
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    )
    cache = torch.randn(2, 12, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE, HALF)
    spec = AttentionSpec(HEAD_DIM**-0.5, sliding_window=window)
    outputs, caches = [], []
    for inputs in (chunked, rows):
        written = cache.clone()
        outputs.append(TritonAttentionBackend().forward(query, key, value, written, inputs.meta, spec))
        caches.append(written)
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outputs[1].float(), outputs[0].float(), atol=HALF_ATOL, rtol=0)
