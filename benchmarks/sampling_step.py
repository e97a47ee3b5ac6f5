"""Micro-benchmark of a decode step's sampling on a GPU: the race kernel on the model's bf16 logits
against widening them to float32 first, beside the copy rate measured in the same run.

The default shape is W1's (256 rows of Llama-3's 128,256-token vocabulary). `--race-module FILE`
also times the `race` function of another copy of sampling/race_kernel.py (for example one taken
from an earlier commit with `git show REV:src/batchlm/sampling/race_kernel.py > /tmp/race_then.py`).
The draws are checked too: bf16 logits must give the tokens of their float32 widening, and a
six-token row must follow the tempered softmax (chi-square, 5 degrees of freedom).

    PYTHONPATH=src python benchmarks/sampling_step.py [--rows 256] [--vocab 128256] [--race-module FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable

import torch

from batchlm.sampling.race_kernel import race

# 99.9% point of chi-square with 5 degrees of freedom.
CHI2_CRIT_DF5 = 20.5
SIX_LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -2.0]


def median_us(fn: Callable[[], object], flush: torch.Tensor, repeats: int = 40) -> float:
    """Median time of `fn` in microseconds, CUDA events around each call, L2 flushed before it."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def load_race(path: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    spec = importlib.util.spec_from_file_location("race_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = module.race
    return function


def chi_square(draw: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], temperature: float) -> float:
    device = torch.device("cuda")
    row = torch.tensor(SIX_LOGITS, device=device)
    draws = 200_000
    tokens = draw(row.repeat(draws, 1), torch.full((draws,), temperature, device=device), 11)
    counts = torch.bincount(tokens, minlength=len(SIX_LOGITS)).double()
    expected = torch.softmax(row.double() / temperature, -1) * draws
    return float(((counts - expected) ** 2 / expected).sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--race-module", help="another race_kernel.py whose race() to time beside ours")
    args = parser.parse_args()

    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    bf16 = (torch.randn(args.rows, args.vocab, device=device, generator=generator) * 3).bfloat16()
    widened = bf16.float()
    temperature = torch.full((args.rows,), args.temperature, device=device)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    source = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_us = median_us(lambda: target.copy_(source), flush)
    seed = 1 << 62

    results = {
        "copy_gb_s": round(2 * source.numel() / copy_us / 1e3, 1),
        "widen_to_float32_us": median_us(lambda: bf16.float(), flush),
        "race_float32_us": median_us(lambda: race(widened, temperature, seed), flush),
        "race_bf16_us": median_us(lambda: race(bf16, temperature, seed), flush),
        "widen_then_race_us": median_us(lambda: race(bf16.float(), temperature, seed), flush),
        "argmax_bf16_us": median_us(lambda: bf16.argmax(-1), flush),
        "argmax_float32_us": median_us(lambda: widened.argmax(-1), flush),
    }
    if args.race_module:
        other = load_race(args.race_module)
        results["other_race_float32_us"] = median_us(lambda: other(widened, temperature, seed), flush)
        results["other_widen_then_race_us"] = median_us(lambda: other(bf16.float(), temperature, seed), flush)
    if not torch.equal(race(bf16, temperature, 7), race(widened, temperature, 7)):
        raise SystemExit("bf16 logits drew other tokens than their float32 widening")
    results["chi_square"] = {str(t): round(chi_square(race, t), 2) for t in (0.7, 1.0, 1.8)}
    if max(results["chi_square"].values()) > CHI2_CRIT_DF5:
        raise SystemExit(f"the draws do not follow the tempered softmax: {results['chi_square']}")
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
