"""Single-stream decode attention under other launch shapes: `offline_throughput.py` with the split
count of a one-request decode and the decode kernel's tile, warps and pipeline stages set by hand,
so the step time (ITL) shows what each shape costs where a profile cannot (under programmatic
dependent launch a kernel's span includes its wait for the one before).

    BATCHLM_DECODE_SHAPE="splits=8 block_n=32 num_warps=4 num_stages=2" \\
        python benchmarks/decode_split_sweep.py --shape llama-3.2-1b --dummy --num-requests 1 \\
        --input-len 512 --output-len 256 --runs 3   (a GPU)

Keys left out keep the engine's own choice; batches of more than one request keep it always.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch

from batchlm.attention import triton_backend
from batchlm.kernels import paged_decode

SETTINGS = dict(item.split("=", 1) for item in os.environ.get("BATCHLM_DECODE_SHAPE", "").split())
KNOWN = {"splits", "block_n", "num_warps", "num_stages", "programs_per_sm"}
if not set(SETTINGS) <= KNOWN:
    sys.exit(f"BATCHLM_DECODE_SHAPE takes {sorted(KNOWN)}, got {sorted(set(SETTINGS) - KNOWN)}")
FORCED_SPLITS = int(SETTINGS.pop("splits")) if "splits" in SETTINGS else None
CONFIG_CHANGES: dict[str, Any] = {key: int(value) for key, value in SETTINGS.items()}

engine_choice = paged_decode.choose_num_splits
engine_config = paged_decode.default_decode_config


def choose_num_splits(
    batch_size: int, num_kv_heads: int, max_context: int, sm_count: int, programs_per_sm: int = 4
) -> int:
    if batch_size == 1 and FORCED_SPLITS is not None:
        return FORCED_SPLITS
    return engine_choice(batch_size, num_kv_heads, max_context, sm_count, programs_per_sm)


def default_decode_config(cache_dtype: torch.dtype) -> paged_decode.DecodeConfig:
    return dataclasses.replace(engine_config(cache_dtype), **CONFIG_CHANGES)


for module in (paged_decode, triton_backend):
    module.choose_num_splits = choose_num_splits  # type: ignore[attr-defined]
    module.default_decode_config = default_decode_config  # type: ignore[attr-defined]
print(f"decode shape: splits={FORCED_SPLITS or 'engine'} {CONFIG_CHANGES or ''}", file=sys.stderr)
sys.argv = ["offline_throughput.py", *sys.argv[1:]]
runpy.run_path(str(Path(__file__).with_name("offline_throughput.py")), run_name="__main__")
