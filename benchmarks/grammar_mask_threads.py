"""How one step's grammar masks scale with llguidance's threads, at a large batch and without a model:
N matchers under the long-output JSON schema (structured_outputs.long_output_schema), filled together
each step, then advanced by one random allowed token each.

    python benchmarks/grammar_mask_threads.py --rows 256 --threads 4 8 12 16 --modes copy pooled
    python benchmarks/grammar_mask_threads.py ... --templates-per-thread 1 2 4   # the pool's size

Modes: `copy`, every matcher a deep copy of one compiled template (they share its lexer and its lock);
`pooled`, matchers from the backend as the engine makes them (LLGuidanceBackend.matcher: copies of
several templates, rows grouped by template); `fresh`, every matcher compiled on its own. The tokenizer
is the benchmarks' 2048-token one under a 128,256-id vocabulary (as in the GPU W1 runs), or padded to
128,256 real entries with --padded-vocab. Prints one JSON line per mode: median ms per step by threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llguidance
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grammar_host_step import tokenizer_dir
from structured_outputs import long_output_schema

import batchlm.structured.llguidance_backend as llguidance_backend
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import GrammarMatcher, allowed_tokens
from batchlm.structured.llguidance_backend import LLGuidanceBackend, LLGuidanceMatcher, validated_grammar
from batchlm.tokenizer.builder import build_tokenizer
from batchlm.tokenizer.hf_loading import load_hf_tokenizer

VOCAB = 128256


def tokenizer(padded: bool) -> object:
    if padded:
        return load_hf_tokenizer(tokenizer_dir(VOCAB), False)
    directory = Path(tempfile.gettempdir()) / "batchlm-mask-threads-small"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        build_tokenizer(directory)
    return load_hf_tokenizer(directory, False)


def make_matchers(backend: LLGuidanceBackend, mode: str, rows: int) -> list[GrammarMatcher]:
    spec = StructuredOutputs(json=json.dumps(long_output_schema()))
    if mode == "pooled":
        return [backend.matcher(spec) for _ in range(rows)]
    grammar = validated_grammar(spec)
    if mode == "copy":
        template = llguidance.LLMatcher(backend.tokenizer, grammar, log_level=0)
        return [LLGuidanceMatcher(template.deep_copy(), (0,)) for _ in range(rows)]
    return [
        LLGuidanceMatcher(llguidance.LLMatcher(backend.tokenizer, grammar, log_level=0), (0,))
        for _ in range(rows)
    ]


def ms_per_step(hf: object, threads: int, rows: int, mode: str, steps: int) -> float:
    backend = LLGuidanceBackend.from_hf(hf, VOCAB, (0,), threads=threads)  # type: ignore[arg-type]
    matchers = make_matchers(backend, mode, rows)
    rng = np.random.default_rng(0)
    bitmask = np.zeros((rows, backend.bitmask_words), dtype=np.int32)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        backend.fill_bitmasks(matchers, bitmask)
        times.append(time.perf_counter() - started)
        for index, matcher in enumerate(matchers):
            matcher.accept(int(rng.choice(allowed_tokens(bitmask[index], VOCAB))))
    return round(1e3 * statistics.median(times[steps // 3 :]), 3)  # past the lexers' first states


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--modes", nargs="+", choices=["copy", "pooled", "fresh"], default=["copy", "pooled"])
    parser.add_argument("--templates-per-thread", type=int, nargs="+", default=None)
    parser.add_argument("--padded-vocab", action="store_true")
    args = parser.parse_args()
    hf = tokenizer(args.padded_vocab)
    for mode in args.modes:
        sizes = args.templates_per_thread or [llguidance_backend.TEMPLATES_PER_THREAD]
        for per_thread in sizes if mode == "pooled" else sizes[:1]:
            llguidance_backend.TEMPLATES_PER_THREAD = per_thread
            result = {t: ms_per_step(hf, t, args.rows, mode, args.steps) for t in args.threads}
            label = {"mode": mode, "templates_per_thread": per_thread} if mode == "pooled" else {"mode": mode}
            print(json.dumps({**label, "rows": args.rows, "ms_per_step_by_threads": result}), flush=True)


if __name__ == "__main__":
    main()
