"""What a decode step's small kernels cost, by leaving them out: `offline_throughput.py` with the
decode attention (and its split reduce), the KV-cache write or RoPE skipped in pure decode steps,
which the CUDA graphs capture so. The tokens are then wrong; only the step time means anything.
Under programmatic dependent launch a kernel's profiled span includes time it sits waiting for the
one before, so leaving a kernel out is how its share of the step shows.

    BATCHLM_ABLATE=attn,kv,rope python benchmarks/decode_step_ablation.py --shape llama-3.2-1b \\
        --dummy --num-requests 1 --input-len 512 --output-len 256 --runs 3   (a GPU)

BATCHLM_ABLATE: a comma-separated subset of attn, kv, rope (empty: nothing left out).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch

from batchlm.attention import triton_backend
from batchlm.layers import rotary

PARTS = {"attn", "kv", "rope"}
LEFT_OUT = {part for part in os.environ.get("BATCHLM_ABLATE", "").split(",") if part}
if not LEFT_OUT <= PARTS:
    sys.exit(f"BATCHLM_ABLATE takes {sorted(PARTS)}, got {sorted(LEFT_OUT - PARTS)}")
# Decode steps only: a prefill chunk has more rows than any decode graph here.
DECODE_ROWS = 256

attention_forward = triton_backend.TritonAttentionBackend.forward
write_kv_cache = triton_backend.write_kv_cache
rope_forward = rotary.RotaryEmbedding.forward


def forward(
    self: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *rest: Any
) -> torch.Tensor:
    kv_cache, meta = rest[0], rest[1]
    if meta.num_decodes != meta.num_requests:
        return attention_forward(self, query, key, value, *rest)
    if "attn" in LEFT_OUT:  # the layer's attention output is its query
        if "kv" not in LEFT_OUT:
            write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        return query
    if "kv" in LEFT_OUT:
        triton_backend.write_kv_cache = lambda *args, **kwargs: None
        try:
            return attention_forward(self, query, key, value, *rest)
        finally:
            triton_backend.write_kv_cache = write_kv_cache
    return attention_forward(self, query, key, value, *rest)


def rope(self: Any, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> Any:
    if "rope" in LEFT_OUT and query.shape[0] <= DECODE_ROWS:
        return query, key
    return rope_forward(self, positions, query, key)


triton_backend.TritonAttentionBackend.forward = forward  # type: ignore[method-assign]
rotary.RotaryEmbedding.forward = rope  # type: ignore[method-assign]
print(f"left out of decode steps: {sorted(LEFT_OUT) or 'nothing'}", file=sys.stderr)
sys.argv = ["offline_throughput.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).with_name("offline_throughput.py")), run_name="__main__")
