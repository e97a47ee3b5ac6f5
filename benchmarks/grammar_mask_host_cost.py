"""The engine thread's own cost of applying one step's grammar bitmasks on a GPU, alone (no model, no
mask threads beside it): the whole `apply_grammar_masks` call and its parts (the pinned upload, the
CUDA event that guards the pinned buffer, the Triton mask kernel's launch), beside a plain torch
launch for scale. Host wall and CPU time per call, medians of five rounds.

    PYTHONPATH=src python benchmarks/grammar_mask_host_cost.py [--rows 256] [--vocab 128256]

Set against profile_step.py --structured's "masks: applied" (the same call inside a W1 run), it tells
how much slower the engine thread's Python runs beside the mask work than alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from batchlm.kernels.grammar_bitmask import apply_bitmask, warm_up
from batchlm.sampling.grammar_mask import BitmaskStaging, apply_grammar_masks
from batchlm.structured.step_masks import GrammarMasks


def host_cost(fn: Callable[[], object], calls: int = 300, rounds: int = 5) -> dict[str, float]:
    """Median over rounds of the host's wall and CPU microseconds per call (the device drained between)."""
    fn()
    torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(rounds):
        cpu_started, started = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - started) / calls * 1e6)
        cpus.append((time.thread_time() - cpu_started) / calls * 1e6)
        torch.cuda.synchronize()
    return {"wall_us": round(statistics.median(walls), 1), "cpu_us": round(statistics.median(cpus), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    device = torch.device("cuda")
    words = (args.vocab + 31) // 32
    logits = torch.randn(args.rows, args.vocab, device=device, dtype=torch.bfloat16)
    warm_up(logits[:1])
    staging = BitmaskStaging(device, words)
    bitmask = staging.buffer(args.rows)
    bitmask[:] = -1  # every token allowed: the kernel reads every word and writes nothing
    masks = GrammarMasks(tuple(range(args.rows)), bitmask)
    on_device = staging.upload(bitmask)
    pinned = torch.empty(args.rows, words, dtype=torch.int32, pin_memory=True)
    parts: dict[str, Callable[[], object]] = {
        "apply_grammar_masks": lambda: apply_grammar_masks(logits, masks, staging),
        "staging.upload": lambda: staging.upload(bitmask),
        "the mask kernel's launch": lambda: apply_bitmask(logits, on_device, None),
        "pinned copy to the device": lambda: pinned.to(device, non_blocking=True),
        "an event made and recorded": lambda: torch.cuda.Event().record(),
        "a one-element torch.add": lambda: torch.add(on_device[:1], 1),
    }
    for name, fn in parts.items():
        print(json.dumps({"part": name, "rows": args.rows} | host_cost(fn)), flush=True)


if __name__ == "__main__":
    main()
