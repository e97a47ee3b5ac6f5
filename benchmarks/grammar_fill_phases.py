"""Where a constrained batch's grammar work goes over a whole output, without a model: N matchers under
the long-output JSON schema walk 256 steps together (fill every mask, then advance each by one random
allowed token), and the fill and advance times are reported by phase of the output: the schema's ten
short fields (steps 0-63), the ends of its length-bounded strings (64-127, on the benchmarks' padded
tokenizer) and the long last field (160-255).

    python benchmarks/grammar_fill_phases.py --configs 1x1 12x48 12x12 12x256
    python benchmarks/grammar_fill_phases.py --configs 1x1 --slices llguidance   # its own slices only
    python benchmarks/grammar_fill_phases.py --configs 1x1 --tokenizer DIR  # a real tokenizer's files

A config is THREADSxTEMPLATES: llguidance's threads and the compiled copies of the grammar the
sequences are spread over (the engine uses 4 per thread beside a GPU). The tokenizer is the
benchmarks' byte-level BPE padded with plain words to 128,256 ids (as in the GPU W1 runs), or
--tokenizer's. --slices picks the token slices (a mask allows a slice's tokens whole when the lexer state
takes any of them, and walks them one by one otherwise): the engine's, llguidance's general ones alone,
or those with other JSON-string slice lengths added (EXTRA_SLICE_LENGTHS).
Prints one JSON line per config: medians in ms per step, and the whole walk's fill time in s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grammar_host_step import tokenizer_dir
from structured_outputs import SUMMARY_FIELDS, long_output_schema

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import (
    EXTRA_STRING_SLICE_LENGTHS,
    LLGuidanceBackend,
    grammar_text,
    token_slices,
    validated_grammar,
)
from batchlm.tokenizer.hf_loading import load_hf_tokenizer

PADDED_VOCAB = 128256
STEPS = 256
# Lengths of the JSON-string slices each --slices kind adds to llguidance's general ones ("engine":
# the backend's own choice, token_slices()).
EXTRA_SLICE_LENGTHS: dict[str, tuple[int, ...]] = {
    "llguidance": (),
    "short": tuple(range(1, 9)),
    "mid": (15, 20, 25),
    "engine": EXTRA_STRING_SLICE_LENGTHS,
    "dense": (2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 17, 20, 24, 27),
    "lean": (4, 8, 15, 20),
}


def walk(backend: LLGuidanceBackend, spec: StructuredOutputs, rows: int, vocab: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    mask = np.zeros((rows, backend.bitmask_words), dtype=np.int32)
    matchers = [backend.matcher(spec) for _ in range(rows)]
    fills, advances = [], []
    for _ in range(STEPS):
        batch = backend.batch(matchers)
        started = time.perf_counter()
        batch.fill(mask)
        fills.append(time.perf_counter() - started)
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        tokens = []
        for row in range(rows):
            allowed = np.flatnonzero(bits[row])
            tokens.append(int(allowed[rng.integers(len(allowed))]))
        started = time.perf_counter()
        batch.advance_one(tokens)
        advances.append(time.perf_counter() - started)

    def median_ms(values: list[float]) -> float:
        return round(1e3 * statistics.median(values), 2)

    return {
        "fill_0_63": median_ms(fills[:64]),
        "fill_64_127": median_ms(fills[64:128]),
        "fill_160_255": median_ms(fills[160:]),
        "advance_160_255": median_ms(advances[160:]),
        "fill_total_s": round(sum(fills), 2),
    }


# Grammars besides JSON schemas, for --probe: what the string slices cost where they never apply.
PROBE_SPECS = {
    "regex": StructuredOutputs(regex=r"[0-9]{1,5}(,[0-9]{1,5}){0,20}"),
    "choice": StructuredOutputs(choice=["positive", "negative", "neutral"]),
    "lark": StructuredOutputs(grammar='start: "SELECT " NAME " FROM " NAME\nNAME: /[a-z_]{1,12}/'),
    "json_object": StructuredOutputs(json_object=True),
}


def resident_mb() -> float:
    """This process's resident memory (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def probe(bare: llguidance.LLTokenizer, kind: str, spec: StructuredOutputs, vocab: int) -> dict[str, Any]:
    """The slices' one-time costs (building them on a tokenizer without any, compiling the schema's
    grammar) and the mean mask time of the other grammars over a 40-token random walk (each mask the
    best of three copies)."""
    rss_before = resident_mb()
    started = time.perf_counter()
    tokenizer = bare.with_slices(token_slices(EXTRA_SLICE_LENGTHS[kind]))
    result: dict[str, Any] = {
        "slices_build_s": round(time.perf_counter() - started, 3),
        "slices_rss_mb": round(resident_mb() - rss_before, 1),
    }
    started = time.perf_counter()
    for _ in range(16):
        llguidance.LLMatcher(tokenizer, validated_grammar(spec), log_level=0)
    result["schema_compile_ms"] = round(1e3 * (time.perf_counter() - started) / 16, 2)
    row = np.zeros((vocab + 31) // 32, dtype=np.int32)
    for name, other in PROBE_SPECS.items():
        rng = np.random.default_rng(0)
        matcher = llguidance.LLMatcher(tokenizer, grammar_text(other), log_level=0)
        times = []
        for _ in range(40):
            if matcher.is_stopped():
                break
            best = float("inf")
            for _ in range(3):
                copy = matcher.deep_copy()
                started = time.perf_counter()
                copy.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
                best = min(best, time.perf_counter() - started)
            times.append(best)
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab])
            matcher.consume_token(int(allowed[rng.integers(len(allowed))]))
        result[f"{name}_mask_us"] = round(1e6 * statistics.mean(times), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--configs", nargs="+", default=["1x1", "12x48"], help="THREADSxTEMPLATES")
    parser.add_argument("--summary-field", choices=sorted(SUMMARY_FIELDS), default="free")
    parser.add_argument("--slices", choices=sorted(EXTRA_SLICE_LENGTHS), default="engine")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer's directory")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="instead of the walks: the slices' one-time costs and other grammars' masks",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    hf = load_hf_tokenizer(args.tokenizer or tokenizer_dir(PADDED_VOCAB))
    vocab = len(hf) if args.tokenizer else PADDED_VOCAB
    eos = [hf.eos_token_id or 0]
    spec = StructuredOutputs(json=json.dumps(long_output_schema(args.summary_field)))
    print(json.dumps({"tokenizer_s": round(time.perf_counter() - started, 1), "vocab": vocab}), flush=True)
    # The llguidance tokenizer once, without slices, to which --probe or the walks add the slices asked for.
    bare = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos, slices=[])  # type: ignore[arg-type]
    if args.probe:
        print(json.dumps({"slices": args.slices} | probe(bare, args.slices, spec, vocab)), flush=True)
        return
    tokenizer = bare.with_slices(token_slices(EXTRA_SLICE_LENGTHS[args.slices]))
    for config in args.configs:
        threads, templates = map(int, config.split("x"))
        backend = LLGuidanceBackend(tokenizer, eos, threads, batched_accept=True)
        backend.templates_per_grammar = templates
        result = walk(backend, spec, args.rows, vocab)
        line = {
            "threads": threads,
            "templates": templates,
            "field": args.summary_field,
            "slices": args.slices,
        }
        print(json.dumps(line | result), flush=True)


if __name__ == "__main__":
    main()
