"""One CPU decode step of a GGUF model in-process, through the fused decode stack
(runner/fused_decode.py) and through the model's own forward, layer by layer, on the same weights and
caches: each of --rows requests first prefills --context tokens, then every round times --steps
decode steps of each path in turn (the same step repeated: the rows' next token written to the same
slot). Prints each round's milliseconds a step and the medians over the rounds; the two paths'
largest logit difference, as a fraction of the largest logit, shows they computed the same step.

    python benchmarks/cpu_decode_step.py --model gpt-oss-small.gguf --context 256 --rows 1 --rounds 7

Run the two paths in one process, rounds alternating, so a machine whose load drifts slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from batchlm.attention.backend import AttentionMetadata
from batchlm.attention.torch_backend import TorchAttentionBackend
from batchlm.models.gguf_model_dir import prepare_gguf_model_dir
from batchlm.models.loader import load_model
from batchlm.runner.fused_decode import build_fused_decode
from batchlm.runner.inputs import StepInputs

BLOCK_SIZE = 16


def step_inputs(token_counts: list[int], starts: list[int], blocks_each: int) -> StepInputs:
    """Row r's token_counts[r] tokens (ids 3, 4, ...) from position starts[r], over blocks
    [r * blocks_each, (r + 1) * blocks_each)."""
    ids, positions, slots, query_starts, seq_lens = [], [], [], [0], []
    for row, (count, start) in enumerate(zip(token_counts, starts, strict=True)):
        for position in range(start, start + count):
            ids.append(3 + position % 100)
            positions.append(position)
            slots.append((row * blocks_each + position // BLOCK_SIZE) * BLOCK_SIZE + position % BLOCK_SIZE)
        query_starts.append(query_starts[-1] + count)
        seq_lens.append(start + count)
    rows = len(token_counts)
    tables = torch.arange(rows * blocks_each, dtype=torch.int32).view(rows, blocks_each)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(query_starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_cpu=query_starts,
        seq_lens_cpu=seq_lens,
        max_query_len=max(token_counts),
        max_seq_len=max(seq_lens),
        num_decodes=rows if all(count == 1 for count in token_counts) else 0,
    )
    sampled = torch.tensor(query_starts[1:]) - 1
    return StepInputs(
        torch.tensor(ids), torch.tensor(positions), meta, sampled, [str(r) for r in range(rows)]
    )


def ms_per_step(step: Callable[[], object], steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def median_ms_per_step(paths: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict[str, float]:
    """Each path's median milliseconds a step over `rounds` rounds of `steps` steps, the paths
    alternating within a round; prints each round's times and the medians."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for round_ in range(rounds):
        for name, path in paths.items():
            times[name].append(ms_per_step(path, steps))
        print(f"round {round_}: " + ", ".join(f"{name} {ms[-1]:.2f} ms" for name, ms in times.items()))
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    print(", ".join(f"median {name}: {ms:.2f} ms a step" for name, ms in medians.items()))
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model_dir = prepare_gguf_model_dir(args.model, Path(tempfile.gettempdir()) / "batchlm-decode-step")
    loaded = load_model(model_dir, torch.float32, torch.device("cpu"), progress=False)
    model, shape = loaded.model, loaded.shape
    blocks_each = -(-(args.context + 1) // BLOCK_SIZE)
    caches = [
        torch.zeros(2, args.rows * blocks_each, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim)
        for _ in range(shape.num_layers)
    ]
    backend = TorchAttentionBackend()
    rows = args.rows
    with torch.inference_mode():
        prefill = step_inputs([args.context] * rows, [0] * rows, blocks_each)
        model(prefill.input_ids, prefill.positions, caches, prefill.meta, backend)
        fused = build_fused_decode(model, caches, backend)
        if fused is None:
            raise SystemExit("the model does not take the fused decode stack (the log says why)")
        decode = step_inputs([1] * rows, [args.context] * rows, blocks_each)

        def layer_by_layer() -> torch.Tensor:
            hidden = model(decode.input_ids, decode.positions, caches, decode.meta, backend)
            return model.compute_logits(hidden)

        def fused_step() -> torch.Tensor:
            return fused.run(decode)

        ours, theirs = fused_step(), layer_by_layer()
        print(f"largest logit difference: {float((ours - theirs).abs().max() / theirs.abs().max()):.2e}")
        medians = median_ms_per_step(
            {"layer by layer": layer_by_layer, "fused": fused_step}, args.rounds, args.steps
        )
    print(f"layer by layer / fused: {medians['layer by layer'] / medians['fused']:.2f}x")


if __name__ == "__main__":
    main()
