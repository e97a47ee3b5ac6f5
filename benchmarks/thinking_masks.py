"""What a thinking block costs a constrained request, without a model: one matcher under a JSON schema
with the reasoning preamble walks a fixed thinking text and then an answer, against one under the
schema alone walking the answer. Reports the grammar's compile time (a fresh schema each round, so no
cache answers) and the median mask fill per token in the thinking and in the answer.

    python benchmarks/thinking_masks.py --tokenizer DIR --rounds 5   # DIR: a tokenizer's files

The tokenizer gets `<think>` and `</think>` as added tokens (Qwen3's kind). One JSON line a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from batchlm.reasoning.registry import THINK
from batchlm.reasoning.split import ReasoningParser
from batchlm.sampling_params import SamplingParams, StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBackend

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
THOUGHT = (
    "Let me think about this. The user wants a person with a name and an age, so I will pick Ada, "
    "who was born in 1815; her age is not what matters here, any number fits the schema. "
) * 3
ANSWER = '{"name":"Ada Lovelace, with a rather long name for the string","age":36}'


def fill_times(backend: LLGuidanceBackend, spec: StructuredOutputs, tokens: Sequence[int]) -> list[float]:
    """Seconds of each mask fill while a matcher of `spec` takes `tokens` one by one."""
    matcher = backend.matcher(spec)
    row = np.empty(backend.bitmask_words, dtype=np.int32)
    times = []
    for token in tokens:
        start = time.perf_counter()
        matcher.fill_bitmask(row)
        times.append(time.perf_counter() - start)
        if not matcher.accept(token):
            raise SystemExit(f"the grammar refused token {token}")
    return times


def compile_ms(backend: LLGuidanceBackend, spec: StructuredOutputs) -> float:
    start = time.perf_counter()
    backend.matcher(spec)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, required=True, help="a directory with a tokenizer.json")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    hf = AutoTokenizer.from_pretrained(args.tokenizer)
    hf.add_tokens([THINK.start, THINK.end])
    added = {marker: hf.get_added_vocab()[marker] for marker in (THINK.start, THINK.end)}
    backend = LLGuidanceBackend.from_hf(hf, len(hf), (int(hf.eos_token_id or 0),))
    thinking = [added[THINK.start], *hf.encode(THOUGHT, add_special_tokens=False), added[THINK.end]]
    answer = hf.encode(ANSWER, add_special_tokens=False)
    parser_ = ReasoningParser(THINK)
    for round_ in range(args.rounds):
        fresh = json.dumps({**SCHEMA, "title": f"round {round_}"})
        plain = StructuredOutputs(json=fresh)
        preamble = parser_.sampling_params(SamplingParams(structured_outputs=plain), added).structured_outputs
        assert preamble is not None
        compiled = {"with_thinking": compile_ms(backend, preamble), "plain": compile_ms(backend, plain)}
        after = fill_times(backend, preamble, thinking + answer)
        alone = fill_times(backend, plain, answer)
        record = {
            "round": round_,
            "vocab": len(hf),
            "compile_ms": {k: round(v, 2) for k, v in compiled.items()},
            "fill_us_median": {
                "thinking": round(statistics.median(after[1 : len(thinking)]) * 1e6, 2),
                "answer_after_thinking": round(statistics.median(after[len(thinking) :]) * 1e6, 2),
                "answer_alone": round(statistics.median(alone) * 1e6, 2),
            },
            "tokens": {"thinking": len(thinking), "answer": len(answer)},
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
