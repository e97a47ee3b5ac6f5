"""What bounds the prefill attention kernel: the same kernel with one of its parts taken out.

Each variant is a copy of kernels/paged_tile.py with one edit, loaded as its own module beside an
unedited copy, and timed at one 8,000-token prompt with Llama-3.2-1B heads (head dim 64, 32 query
and 8 KV heads) in a few tile shapes. The edited kernels compute wrong attention; only their time
says something:
- noload: each range's first key and value tile is loaded once, before its loop, and reused
  (no gathered loads in the loop);
- noexp: the probabilities are the log2-domain scores themselves (no exp2 a score);
- nopv: no probabilities-times-values product (and so no value loads);
- noexp_noload: both of the first two.

    PYTHONPATH=src python benchmarks/prefill_attention_probe.py [variant ...]
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from attention_kernels import median_ms, paged_setup

from batchlm.kernels import paged_prefill
from batchlm.kernels.paged_prefill import PrefillConfig

KERNELS = Path(paged_prefill.__file__).parent
LOOP = """    for tile_start in range(kv_start, kv_stop, BLOCK_N):
        acc, row_max, row_sum = attend_tile("""
LOOP_OVER_ONE_TILE = """    tokens0, in_range0, offsets0 = tile_addresses(
        block_row, kv_start, kv_end, stride_c_block, stride_c_tok, BLOCK_SIZE, HEAD_DIM, BLOCK_N, MASK_MODE
    )
    k0 = load_rows(kv_base + offsets0, in_range0, MASK_MODE)
    v0 = load_rows(kv_base + offsets0 + stride_c_kv, in_range0, MASK_MODE)
    for tile_start in range(kv_start, kv_stop, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        in_range = tokens < kv_end
        probs, rescale, row_max, row_sum = softmax_update(
            q, k0, row_max, row_sum, q_pos, tokens, in_range, qk_scale, window, softcap,
            MASK_MODE, DOT_PRECISION, SOFTCAP,
        )
        acc = values_update(acc, probs, rescale, v0, q.dtype, DOT_PRECISION, FP8_IN_REGISTERS)
    if False:
        acc, row_max, row_sum = attend_tile("""
EXP = (
    "probs = tl.exp2(scores * qk_scale - new_max[:, None])",
    "probs = scores * qk_scale - new_max[:, None]",
)
PV = (
    "return acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)",
    "return acc * rescale[:, None] + tl.sum(probs, 1)[:, None]",
)
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "base": [],
    "noload": [(LOOP, LOOP_OVER_ONE_TILE)],
    "noexp": [EXP],
    "nopv": [PV],
    "noexp_noload": [EXP, (LOOP, LOOP_OVER_ONE_TILE)],
}
CONFIGS = [None, PrefillConfig(128, 64, 8, 2), PrefillConfig(128, 64, 4, 2), PrefillConfig(64, 64, 4, 3)]


def load_variant(name: str) -> ModuleType:
    """The prefill module over an edited copy of the tile step, as package `v_<name>`."""
    tile = (KERNELS / "paged_tile.py").read_text()
    for before, after in VARIANTS[name]:
        assert before in tile, f"{name}: the kernel no longer has {before[:40]!r}"
        tile = tile.replace(before, after)
    package = Path(tempfile.mkdtemp(prefix=f"prefill_{name}_")) / f"v_{name}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "paged_tile.py").write_text(tile)
    prefill = (KERNELS / "paged_prefill.py").read_text()
    (package / "paged_prefill.py").write_text(
        prefill.replace("batchlm.kernels.paged_tile", f"v_{name}.paged_tile")
    )
    sys.path.insert(0, str(package.parent))
    return importlib.import_module(f"v_{name}.paged_prefill")


def main() -> None:
    length, heads, kv_heads, head_dim = 8000, 32, 8, 64
    cache, tables, seq_lens = paged_setup(1, length, kv_heads, head_dim, 16)
    query = torch.randn(length, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    starts = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    flops = 4 * heads * head_dim * length * (length / 2)
    for name in sys.argv[1:] or list(VARIANTS):
        module = load_variant(name)
        for config in CONFIGS:

            def run(m: ModuleType = module, c: PrefillConfig | None = config) -> object:
                return m.paged_prefill_attention(
                    query, cache, starts, seq_lens, tables, 0.125, length, config=c
                )

            ms = median_ms(run)
            print(f"{name:14s} {config!s:70s} {ms:.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
