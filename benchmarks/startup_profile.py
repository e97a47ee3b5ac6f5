"""Where the engine core's start-up goes on the GPU, in one process: imports, model, profile run, KV cache,
each CUDA-graph capture and every Triton compile (or Triton cache load); then, with --padding, what
padding a decode batch up to a coarser set of captured sizes costs (replays of the padded graph
against the exact one, every row a real request over --context tokens).

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/startup_profile.py --json-out cold.json
    python benchmarks/startup_profile.py --padding --json-out warm.json   # same cache: warm
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import write_config_only

PHASES: dict[str, float] = {}
COMPILES: list[dict[str, Any]] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    PHASES[name] = round(time.perf_counter() - started, 3)
    print(f"{name:<36} {PHASES[name]:8.3f} s", flush=True)


def watch_triton_compiles() -> None:
    """Record each Triton compile (or load from Triton's disk cache): kernel, constexprs, seconds."""
    from triton import knobs

    started: dict[str, float] = {}

    def before(*, key: Any, fn: Any, **_: Any) -> None:
        started[str(key)] = time.perf_counter()

    def after(*, key: Any, fn: Any, compile: Any, **_: Any) -> None:
        seconds = time.perf_counter() - started.pop(str(key), time.perf_counter())
        constants = {str(k): str(v) for k, v in compile["constants"].items()}
        COMPILES.append({"kernel": fn.name, "seconds": round(seconds, 3), "constexprs": constants})

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after


def build_runner(args: argparse.Namespace) -> Any:
    from batchlm.config import EngineConfig
    from batchlm.runner.model_runner import ModelRunner

    model_dir = write_config_only(args.shape, Path(tempfile.gettempdir()) / f"batchlm-bench-{args.shape}")
    config = EngineConfig(
        model=str(model_dir),
        load_format="dummy",
        max_model_len=args.max_model_len,
        max_num_seqs=args.batch_size,
        enable_prefix_caching=False,
        enforce_eager=True,  # graphs are captured below, one size at a time, timed
    )
    return ModelRunner(config, model_dir)


def fill_decode_rows(graphs: Any, count: int, context: int, block_size: int) -> None:
    """Rows [0, count) decode at position context-1 over their own blocks; the rest are padding."""
    import torch

    buf = graphs.buffers
    blocks_per_row = -(-context // block_size)
    rows = torch.arange(count, device=buf.seq_lens.device, dtype=torch.int32)
    tables = rows[:, None] * blocks_per_row + torch.arange(
        blocks_per_row, device=rows.device, dtype=torch.int32
    )
    buf.block_tables[:count, :blocks_per_row].copy_(tables)
    buf.seq_lens[:count].fill_(context)
    buf.seq_lens[count:].fill_(0)
    buf.positions[:count].fill_(context - 1)
    buf.slot_mapping[:count].copy_(tables[:, -1].long() * block_size + (context - 1) % block_size)
    buf.slot_mapping[count:].fill_(-1)


def replay_ms(graph: Any, repeats: int) -> float:
    import torch

    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / repeats


def padding_costs(graphs: Any, args: argparse.Namespace, block_size: int) -> list[dict[str, Any]]:
    """Step time of `count` real rows replayed in every captured size from `count` up to twice it."""
    counts = sorted({*range(1, graphs.max_batch + 1, 8), *(s + 1 for s in graphs.sizes), *graphs.sizes})
    rows = []
    for count in (c for c in counts if c <= graphs.max_batch):
        fill_decode_rows(graphs, count, args.context, block_size)
        targets = [s for s in graphs.sizes if count <= s <= 2 * count]
        times = {s: round(replay_ms(graphs.graphs[s], args.repeats), 4) for s in targets}
        rows.append({"count": count, "replay_ms_by_size": times})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch-size", type=int, default=256, help="max_num_seqs (largest graph)")
    parser.add_argument("--max-model-len", type=int, default=512 + 256 + 64)
    parser.add_argument("--padding", action="store_true", help="also measure padded replays")
    parser.add_argument("--context", type=int, default=640, help="tokens per row in padded replays")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with phase("import torch"):
        import torch
    with phase("import triton"):
        import triton  # noqa: F401
    with phase("import transformers"):
        import transformers  # noqa: F401
    watch_triton_compiles()
    with phase("model runner (eager)"):
        runner = build_runner(args)
    before = len(COMPILES)
    with phase("profile run"):
        num_blocks = runner.determine_num_blocks()
    print(f"  Triton compiles in the profile run: {len(COMPILES) - before}")
    with phase("KV cache allocation"):
        runner.allocate_kv_cache(num_blocks)
        torch.cuda.synchronize()
    from batchlm.runner.cuda_graph import DecodeGraphs

    graphs = DecodeGraphs(
        runner.model, runner.kv_caches, runner.attn, args.batch_size,
        -(-runner.max_model_len // runner.config.block_size), runner.device,
    )  # fmt: skip
    before = len(COMPILES)
    with phase("CUDA graphs"):
        graphs.capture()
    print(f"  Triton compiles during capture: {len(COMPILES) - before}")
    print("  capture seconds by size:", {s: round(t, 3) for s, t in sorted(graphs.capture_seconds.items())})
    for entry in COMPILES:
        print(f"  compile {entry['kernel']:<24} {entry['seconds']:6.3f} s")
    result: dict[str, Any] = {
        "phases_s": PHASES,
        "capture_s_by_size": {str(s): round(t, 4) for s, t in sorted(graphs.capture_seconds.items())},
        "triton_compiles": COMPILES,
        "device": torch.cuda.get_device_name(),
    }
    if args.padding:
        with phase("padding measurements"):
            result["padding"] = padding_costs(graphs, args, runner.config.block_size)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
