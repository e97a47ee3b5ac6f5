"""Where a constrained batch's grammar work goes over a whole output, without a model: N matchers under
the long-output JSON schema walk 256 steps together (fill every mask, then advance each by one random
allowed token), and the fill and advance times are reported by phase of the output: the schema's ten
short fields (steps 0-63), the ends of its length-bounded strings (64-127, on the benchmarks' padded
tokenizer) and the long last field (160-255).

    python benchmarks/grammar_fill_phases.py --configs 1x1 12x48 12x12 12x256
    python benchmarks/grammar_fill_phases.py --configs 1x1 --slices short   # shorter string slices
    python benchmarks/grammar_fill_phases.py --configs 1x1 --tokenizer DIR  # a real tokenizer's files

A config is THREADSxTEMPLATES: llguidance's threads and the compiled copies of the grammar the
sequences are spread over (the engine uses 4 per thread beside a GPU). The tokenizer is the
benchmarks' byte-level BPE padded with plain words to 128,256 ids (as in the GPU W1 runs), or
--tokenizer's. --slices short adds string slices of at most 1..8 characters before llguidance's
general ones (its masks skip the token walk for a slice the lexer state allows whole).
Prints one JSON line per config: medians in ms per step, and the whole walk's fill time in s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import llguidance
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_vs_mlx_lm_server import pad_tokenizer_vocab
from structured_outputs import SUMMARY_FIELDS, long_output_schema

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.tokenizer.builder import build_tokenizer
from batchlm.tokenizer.hf_loading import load_hf_tokenizer

PADDED_VOCAB = 128256
STEPS = 256
# JSON string characters, as llguidance's own string slices spell them.
STRING_CHAR = '[^"\\\\\\x00-\\x1F\\x7F]'


def slices(kind: str) -> list[str]:
    general = llguidance.LLTokenizer.general_slices()
    if kind == "general":
        return general
    return [general[0]] + [f"{STRING_CHAR}{{1,{n}}}" for n in range(1, 9)] + general[1:]


def padded_tokenizer_dir() -> Path:
    directory = Path(tempfile.gettempdir()) / "batchlm-grammar-fill-tokenizer"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(exist_ok=True)
        build_tokenizer(directory)
        pad_tokenizer_vocab(directory / "tokenizer.json", PADDED_VOCAB)
    return directory


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--configs", nargs="+", default=["1x1", "12x48"], help="THREADSxTEMPLATES")
    parser.add_argument("--summary-field", choices=sorted(SUMMARY_FIELDS), default="free")
    parser.add_argument("--slices", choices=["general", "short"], default="general")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer's directory")
    args = parser.parse_args()
    started = time.perf_counter()
    hf = load_hf_tokenizer(args.tokenizer or padded_tokenizer_dir())
    vocab = len(hf) if args.tokenizer else PADDED_VOCAB
    eos = [hf.eos_token_id or 0]
    spec = StructuredOutputs(json=json.dumps(long_output_schema(args.summary_field)))
    print(json.dumps({"tokenizer_s": round(time.perf_counter() - started, 1), "vocab": vocab}), flush=True)
    for config in args.configs:
        threads, templates = map(int, config.split("x"))
        plain = LLGuidanceBackend.from_hf(hf, vocab, eos, threads)
        backend = LLGuidanceBackend(
            plain.tokenizer.with_slices(slices(args.slices)),
            plain.eos_token_ids,
            threads,
            batched_accept=True,
        )
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
