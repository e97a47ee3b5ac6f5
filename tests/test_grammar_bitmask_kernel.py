"""The Triton kernel that applies packed grammar bitmasks, run on the CPU through Triton's interpreter
against the numpy unpacking the CPU engine uses: forbidden tokens become -inf, allowed logits and rows
without a mask keep their exact values, in float32 and in the 16-bit dtypes models make logits in. (On a GPU, tests/gpu/test_structured_gpu.py runs it for real.)"""

from __future__ import annotations

from interpreter_harness import run_interpreted

INTERPRET_CHECK = """
import numpy as np
import torch

from batchlm.kernels.grammar_bitmask import apply_bitmask, warm_up
from batchlm.sampling.grammar_mask import forbidden_on_host

rng = np.random.default_rng(0)
cases = [(1000, (0, 2, 3), 5), (128256, (0, 1), 2), (70, (1,), 3), (4097, (0, 1, 2), 3)]
for (vocab, rows, batch), dtype in zip(cases, [torch.float32, torch.bfloat16, torch.float32, torch.float16]):
    words = (vocab + 31) // 32
    bitmask = rng.integers(-(2**31), 2**31 - 1, size=(len(rows), words), dtype=np.int64).astype(np.int32)
    bitmask[0, : words // 2] = -1  # a run of allowed tokens
    bitmask[-1, words // 2 :] = 0  # and one of forbidden ones
    logits = torch.randn(batch, vocab).to(dtype)  # masked in the model's own dtype
    expected = logits.clone()
    forbidden = torch.from_numpy(forbidden_on_host(bitmask, vocab).copy())
    for index, row in enumerate(rows):
        expected[row][forbidden[index]] = float("-inf")
    got = logits.clone()
    every_row = rows == tuple(range(batch))
    row_ids = None if every_row else torch.tensor(rows, dtype=torch.int64)
    apply_bitmask(got, torch.from_numpy(bitmask), row_ids)
    assert torch.equal(got, expected), (vocab, rows, dtype)
logits = torch.randn(1, 1000)
untouched = logits.clone()
warm_up(logits)  # every bit set: nothing written
assert torch.equal(logits, untouched)
print("bitmask kernel ok")
"""


def test_bitmask_kernel_under_the_triton_interpreter() -> None:
    run_interpreted(INTERPRET_CHECK, "bitmask kernel ok", timeout=300)
