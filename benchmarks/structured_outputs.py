"""Structured outputs on the CPU (issue 17): the grammar mask's cost per token, and the throughput cost of
constrained decoding at concurrency 16 (constrained and unconstrained runs alternating on one engine).

    python benchmarks/structured_outputs.py --runs 5
    python benchmarks/structured_outputs.py --tokenizer ./smollm2-tokenizer --runs 5   # a real tokenizer

The model is a random-weight SmolLM2-135M shape (float32). Its tokenizer is our byte-level BPE padded with
plain words up to the model's 49152 ids (a real-size vocabulary built offline), or --tokenizer's files.
Mask time: one matcher walks the 10-field schema below (random allowed tokens), each mask timed alone;
then the 16-row masks of one step (computed together) and their application to [16, V] logits.
Throughput: 16 requests at once, the constrained ones under the schema; each unconstrained request
generates as many tokens as its counterpart did in the constrained run before it. Prints one JSON line
per run and a summary of medians.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_vs_mlx_lm_server import pad_tokenizer_vocab
from model_shapes import SHAPES, write_random_weights

# About ten fields, the kind of record an extraction request asks for.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
        "member": {"type": "boolean"},
        "plan": {"enum": ["free", "pro", "team", "enterprise"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "city": {"type": "string", "maxLength": 20},
        "visits": {"type": "integer", "minimum": 0, "maximum": 100000},
        "notes": {"type": ["string", "null"], "maxLength": 40},
    },
    "required": ["name", "age", "email", "member", "plan", "score", "tags", "city", "visits", "notes"],
    "additionalProperties": False,
}


# The last field of long_output_schema, by the name the benchmarks' --summary-field takes.
SUMMARY_FIELDS: dict[str, dict[str, Any]] = {
    "bounded": {"type": "string", "minLength": 4000},
    "free": {"type": "string"},
}


def long_output_schema(summary_field: str = "bounded") -> dict[str, Any]:
    """SCHEMA with a last free-text field no output finishes within a few hundred tokens, so that with
    ignore_eos every token of a fixed-length run is generated under a live grammar. "bounded": the
    field has "minLength": 4000, so it cannot end; "free": a plain string, which a random model
    rarely closes (few tokens of a large vocabulary end a JSON string) but llguidance masks far more
    cheaply (its precomputed string slices apply only without a length bound)."""
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["summary"] = dict(SUMMARY_FIELDS[summary_field])
    schema["required"].append("summary")
    return schema


def override_grammar_settings(
    mask_threads: int | None = None,
    templates_per_thread: int | None = None,
    switch_interval_ms: float | None = None,
) -> None:
    """Replace the engine's own grammar settings for a benchmark run (None keeps the engine's): the
    llguidance threads, the compiled copies of a grammar per thread, and the GIL switch interval set
    once constrained requests run. Call it before the engine builds its grammar backend."""
    if mask_threads:
        import batchlm.structured.factory as factory

        factory.mask_threads = lambda on_accelerator=False: mask_threads
    if templates_per_thread:
        import batchlm.structured.llguidance_backend as llguidance_backend

        llguidance_backend.TEMPLATES_PER_THREAD = templates_per_thread
    if switch_interval_ms is not None:
        import batchlm.structured.sequences as structured_sequences

        interval = switch_interval_ms / 1e3
        structured_sequences.hand_over_the_gil_sooner = lambda: sys.setswitchinterval(interval)


def prepare_model(shape: str, tokenizer: Path | None) -> Path:
    """Random weights of `shape`; the tokenizer padded to the model's vocabulary, or --tokenizer's files."""
    directory = (
        Path(tempfile.gettempdir()) / f"batchlm-structured-{shape}{'-own-tokenizer' if tokenizer else ''}"
    )
    write_random_weights(shape, directory)
    if tokenizer is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer / name).exists():
                shutil.copy(tokenizer / name, directory / name)
    else:
        pad_tokenizer_vocab(directory / "tokenizer.json", SHAPES[shape]["vocab_size"])
    return directory


def time_masks(model_dir: Path, vocab_size: int, rows: int, seed: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from batchlm.config import EngineConfig
    from batchlm.sampling.grammar_mask import apply_grammar_masks
    from batchlm.sampling_params import StructuredOutputs
    from batchlm.structured.backend import allowed_tokens
    from batchlm.structured.factory import backend_factory
    from batchlm.structured.step_masks import GrammarMasks

    started = time.perf_counter()
    backend = backend_factory(EngineConfig(model=str(model_dir)), model_dir, vocab_size)((0,))
    build_s = time.perf_counter() - started
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    rng = random.Random(seed)
    single: list[float] = []
    matchers = [backend.matcher(spec) for _ in range(rows)]
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    batch = np.empty((rows, backend.bitmask_words), dtype=np.int32)
    batch_s, apply_s = [], []
    logits = torch.randn(rows, vocab_size)
    for _ in range(400):
        live = [m for m in matchers if not m.is_terminated]
        if not live:
            break
        started = time.perf_counter()
        live[0].fill_bitmask(row)
        single.append(time.perf_counter() - started)
        started = time.perf_counter()
        backend.fill_bitmasks(matchers, batch)
        batch_s.append(time.perf_counter() - started)
        scratch = logits.clone()
        started = time.perf_counter()
        apply_grammar_masks(scratch, GrammarMasks(tuple(range(rows)), batch))
        apply_s.append(time.perf_counter() - started)
        for index, matcher in enumerate(matchers):
            if not matcher.is_terminated:
                matcher.accept(int(rng.choice(allowed_tokens(batch[index], vocab_size).tolist())))
    us = [1e6 * s for s in single]
    return {
        "backend_build_s": round(build_s, 2),
        "tokens_walked": len(single),
        "mask_us_median": round(statistics.median(us), 1),
        "mask_us_p90": round(sorted(us)[int(0.9 * len(us))], 1),
        f"masks_{rows}_rows_ms_median": round(1e3 * statistics.median(batch_s), 3),
        f"apply_{rows}_rows_ms_median": round(1e3 * statistics.median(apply_s), 3),
    }


def time_throughput(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from batchlm import LLM, SamplingParams
    from batchlm.sampling_params import StructuredOutputs

    llm = LLM(model=str(model_dir), device="cpu", max_num_seqs=args.concurrency, enable_prefix_caching=False)
    rng = random.Random(args.seed)
    vocab = SHAPES[args.shape]["vocab_size"]
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    constrained = SamplingParams(
        temperature=1.0, max_tokens=args.max_tokens, structured_outputs=spec, detokenize=False
    )
    llm.generate([[0, 5, 6]] * 2, constrained, use_tqdm=False)  # warm-up, grammar backend built
    results: list[dict[str, Any]] = []
    # Each unconstrained request is as long as its counterpart in the constrained run before it, so
    # both runs drain the batch alike: constrained outputs end where their JSON does, and a run of
    # equal lengths would keep all rows busy to the end where the constrained run's batch thins out.
    lengths_to_match = [args.max_tokens] * args.concurrency
    for run in range(args.runs):
        for kind in ("structured", "plain"):
            prompts = [
                [rng.randrange(16, vocab) for _ in range(args.input_len)] for _ in range(args.concurrency)
            ]
            plain = [
                SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True, detokenize=False)
                for length in lengths_to_match
            ]
            started = time.perf_counter()
            outputs = llm.generate(prompts, constrained if kind == "structured" else plain, use_tqdm=False)
            elapsed = time.perf_counter() - started
            lengths = [len(o.outputs[0].token_ids) for o in outputs]
            if kind == "structured":
                lengths_to_match = lengths
            results.append({"run": run, "kind": kind, "elapsed_s": round(elapsed, 3), "output_tokens": sum(lengths),
                            "output_tok_s": round(sum(lengths) / elapsed, 1)})  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="a directory with a tokenizer.json to use"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    model_dir = prepare_model(args.shape, args.tokenizer)
    summary: dict[str, Any] = {
        "shape": args.shape,
        "tokenizer": str(args.tokenizer or "padded byte-level BPE"),
    }
    summary.update(time_masks(model_dir, SHAPES[args.shape]["vocab_size"], args.concurrency, args.seed))
    print(json.dumps(summary), flush=True)
    if args.skip_throughput:
        return
    results = time_throughput(model_dir, args)
    for kind in ("structured", "plain"):
        summary[f"{kind}_tok_s_median"] = statistics.median(
            r["output_tok_s"] for r in results if r["kind"] == kind
        )
    summary["structured_over_plain"] = round(
        summary["structured_tok_s_median"] / summary["plain_tok_s_median"], 3
    )
    summary["date"] = time.strftime("%Y-%m-%d %H:%M")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
