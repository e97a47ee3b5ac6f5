"""The host's grammar work per decode step at a large batch, without a model: the runner's mask path
(runner/grammar.StepMasks) over N rows under the ~10-field schema, with a 128k-id tokenizer, and the
sampled tokens "landing" at a moment this script picks, as a device would deliver them.

    python benchmarks/grammar_host_step.py --rows 256 --steps 60 --engine-python-ms 1.5
    python benchmarks/grammar_host_step.py ... --accept one   # one consume_token call per token
    python benchmarks/grammar_host_step.py ... --passes 2     # a second batch of requests, same grammar
    python benchmarks/grammar_host_step.py ... --engine-python-ms 0 --busy-processes 1  # a busy core, no GIL

Threads and the way matchers advance default to the engine's choice on this host (beside a GPU when
one is visible).

Per step it reports the engine thread's own grammar work (taking the prefetched masks, handing the next
step's job to the worker) and the worker's time from the tokens' landing to the next masks being ready,
while the engine thread runs `--engine-python-ms` of plain Python meanwhile (the scheduling and output
processing it does then), so the GIL is contended as in a serving engine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_contention import BUSY_KINDS, busy_processes
from mlx_vs_mlx_lm_server import pad_tokenizer_vocab
from structured_outputs import SUMMARY_FIELDS, long_output_schema, override_grammar_settings

from batchlm.core.step_io import PLACEHOLDER_TOKEN_ID
from batchlm.runner.grammar import StepMasks
from batchlm.runner.host_flag import ThreadFlag
from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.sequences import ConstrainedSequences


class LandingTokens:
    """A launched step's tokens as the runner's PendingStepOutput offers them to the mask worker."""

    def __init__(self, lists: list[list[int]], tokens: list[int]) -> None:
        self.positions = tuple(len(tokens_so_far) for tokens_so_far in lists)
        for tokens_so_far in lists:
            tokens_so_far.append(PLACEHOLDER_TOKEN_ID)
        self._tokens = tokens
        self.landed = threading.Event()
        self.landed_at = 0.0

    def peek_token_ids(self) -> list[int]:
        self.landed.wait()
        return list(self._tokens)

    def land(self) -> None:
        self.landed_at = time.perf_counter()
        self.landed.set()


class TimedFlag(ThreadFlag):
    """A ThreadFlag noting when each ticket is released: the moment the worker has written the masks,
    which a device waiting on the flag would see (the calling thread may notice later, once its own
    Python is done)."""

    def __init__(self) -> None:
        super().__init__()
        self.released_at: dict[int, float] = {}

    def release(self, ticket: int) -> None:
        self.released_at[ticket] = time.perf_counter()
        super().release(ticket)


class TimedExecutor:
    """llguidance's executor with its batched calls ("fill", "advance") timed alone, apart from the
    Python around them; each call's seconds go to `record` (by default, to `seconds`, in order)."""

    def __init__(self, inner: Any, record: Callable[[str, float], None] | None = None) -> None:
        self.inner = inner
        self.seconds: dict[str, list[float]] = {"fill": [], "advance": []}
        self._record = record or (lambda name, seconds: self.seconds[name].append(seconds))

    def unsafe_compute_mask_ptr(self, *args: Any) -> None:
        started = time.perf_counter()
        self.inner.unsafe_compute_mask_ptr(*args)
        self._record("fill", time.perf_counter() - started)

    def consume_token_par(self, *args: Any) -> list[bool]:
        started = time.perf_counter()
        accepted: list[bool] = self.inner.consume_token_par(*args)
        self._record("advance", time.perf_counter() - started)
        return accepted

    def medians_ms(self, skip: int) -> dict[str, float]:
        return {
            f"llguidance_{name}_ms_median": round(1e3 * statistics.median(times[skip:]), 3)
            for name, times in self.seconds.items()
            if len(times) > skip
        }


def tokenizer_dir(vocab_size: int) -> Path:
    from batchlm.tokenizer.builder import build_tokenizer

    directory = Path(tempfile.gettempdir()) / f"batchlm-grammar-host-{vocab_size}"
    if not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        build_tokenizer(directory)
        pad_tokenizer_vocab(directory / "tokenizer.json", vocab_size)
    return directory


def pick_tokens(bitmask: np.ndarray, rng: np.random.Generator) -> list[int]:
    """One allowed token per row, at random (the sampler's part, not timed)."""
    picks = []
    for row in bitmask:
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        picks.append(int(rng.choice(allowed)))
    return picks


def busy_python(seconds: float) -> float:
    """Plain Python for `seconds` of wall time, as a fixed amount of work: the first call calibrates
    how many loop rounds that is with nothing else running; later calls run that many rounds and
    return how long they took (longer when the mask worker takes the GIL or the core meanwhile)."""
    rounds = _CALIBRATED.get(seconds)
    if rounds is None:  # rounds a second, over 0.2 s alone
        rate, started = 0, time.perf_counter()
        while time.perf_counter() < started + 0.2:
            sum(range(50))
            rate += 1
        rounds = _CALIBRATED[seconds] = max(1, round(rate / (time.perf_counter() - started) * seconds))
    started = time.perf_counter()
    for _ in range(rounds):
        sum(range(50))
    return time.perf_counter() - started


_CALIBRATED: dict[float, int] = {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--mask-threads", type=int, help="llguidance threads (default: the engine's choice)")
    parser.add_argument("--engine-python-ms", type=float, default=1.5)
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        help="Python's GIL switch interval while the worker runs (default: the engine's choice)",
    )
    parser.add_argument(
        "--accept", choices=["one", "batched"], help="advance matchers one call per token or batched"
    )
    parser.add_argument(
        "--summary-field",
        choices=sorted(SUMMARY_FIELDS),
        default="bounded",
        help="the schema's last, long text field has minLength 4000 or no bound",
    )
    parser.add_argument(
        "--hand-to-device",
        action="store_true",
        help="give StepMasks a flag, as on a GPU, so steady steps take the masks without waiting for them",
    )
    parser.add_argument(
        "--busy-processes",
        type=int,
        default=0,
        metavar="N",
        help="N other processes keep cores busy meanwhile (cores taken without the GIL: against "
        "--engine-python-ms, which takes a core and the GIL)",
    )
    parser.add_argument("--busy-kind", choices=sorted(BUSY_KINDS), default="spin")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="runs of --steps steps, each with new requests under the grammar compiled by the first",
    )
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from batchlm.structured.factory import mask_threads

    beside_gpu = torch.cuda.is_available()
    threads = args.mask_threads or mask_threads(beside_gpu)
    batched = args.accept == "batched" if args.accept else beside_gpu
    hf = AutoTokenizer.from_pretrained(tokenizer_dir(args.vocab_size))
    backend = LLGuidanceBackend.from_hf(hf, args.vocab_size, (0,), threads=threads, batched_accept=batched)
    llguidance_calls = TimedExecutor(backend._executor)
    backend._executor = llguidance_calls  # type: ignore[assignment]
    override_grammar_settings(switch_interval_ms=args.switch_interval_ms)
    sequences = ConstrainedSequences(lambda eos: backend)
    spec = StructuredOutputs(json=json.dumps(long_output_schema(args.summary_field)))
    busy_python(args.engine_python_ms / 1e3)  # calibrated alone, before the worker runs
    for run in range(args.passes):
        llguidance_calls.seconds = {"fill": [], "advance": []}
        with busy_processes(args.busy_processes, args.busy_kind):
            timings = run_pass(sequences, backend.bitmask_words, spec, args, run)
        warm = slice(args.steps // 5, None)
        print(
            json.dumps(
                {
                    "pass": run,
                    "rows": args.rows,
                    "summary_field": args.summary_field,
                    "mask_threads": threads,
                    "accept": "batched" if batched else "one at a time",
                    "engine_python_ms": args.engine_python_ms,
                    "busy_processes": args.busy_processes,
                    "hand_to_device": args.hand_to_device,
                    "switch_interval_ms": round(sys.getswitchinterval() * 1e3, 3),
                    # That fixed work's wall time beside the worker: more than engine_python_ms by
                    # what the worker took from the engine thread (the GIL, or the core).
                    "engine_python_took_ms_median": round(statistics.median(timings["engine_work"][warm]), 3),
                    "engine_grammar_ms_median": round(statistics.median(timings["engine"][warm]), 3),
                    # Seen by the calling thread (after its own Python), and written by the worker
                    # (with --hand-to-device: the flag's release, what a device would wait for).
                    "masks_ready_after_tokens_ms_median": round(statistics.median(timings["ready"][warm]), 3),
                    **(
                        {
                            "masks_written_after_tokens_ms_median": round(
                                statistics.median(timings["written"][warm]), 3
                            )
                        }
                        if timings["written"]
                        else {}
                    ),
                    # Every step, the first fifth included: what a pass's start costs.
                    "masks_ready_after_tokens_ms_mean_all_steps": round(
                        statistics.fmean(timings["ready"]), 3
                    ),
                    # The same steps' time inside llguidance's batched calls (the rest is Python).
                    **llguidance_calls.medians_ms(args.steps // 5),
                }
            )
        )
    sequences.close()


def mask_buffers(rows: int, words: int) -> Callable[[int], np.ndarray]:
    """The runner's MaskBuffer without a GPU: a ring of four."""
    ring = [np.empty((rows, words), dtype=np.int32) for _ in range(4)]
    turn = itertools.count()
    return lambda wanted: ring[next(turn) % len(ring)][:wanted]


def run_pass(
    sequences: ConstrainedSequences,
    words: int,
    spec: StructuredOutputs,
    args: argparse.Namespace,
    run: int,
) -> dict[str, list[float]]:
    """`args.steps` decode steps of `args.rows` new requests under `spec` (the grammar compiled by an
    earlier pass is reused, as a later batch of requests reuses it); per step, ms: the engine thread's
    grammar work, its plain Python's wall time, and the masks' readiness after the tokens landed."""
    request_ids = tuple(f"pass{run}-r{i}" for i in range(args.rows))
    lists: list[list[int]] = [[] for _ in request_ids]
    for request_id, tokens in zip(request_ids, lists, strict=True):
        sequences.add(request_id, spec, tokens, (0,))
    flag = TimedFlag() if args.hand_to_device else None
    masks = StepMasks(sequences, mask_buffers(args.rows, words), flag)
    rng = np.random.default_rng(run)
    timings: dict[str, list[float]] = {
        "engine": [],
        "ready": [],
        "written": [],
        "engine_work": [],
    }
    for _ in range(args.steps):
        started = time.perf_counter()
        step = masks.start(request_ids)
        grammar = masks.result(step, lambda: None)
        assert grammar is not None
        taken = time.perf_counter() - started
        picked = pick_tokens(grammar.bitmask, rng)
        landing = LandingTokens(lists, picked)
        started = time.perf_counter()
        masks.prefetch(step, landing)  # type: ignore[arg-type]
        timings["engine"].append(1e3 * (taken + time.perf_counter() - started))
        landing.land()
        timings["engine_work"].append(1e3 * busy_python(args.engine_python_ms / 1e3))
        prefetched = masks._prefetched
        assert prefetched is not None
        prefetched.future.result()
        timings["ready"].append(1e3 * (time.perf_counter() - landing.landed_at))
        if flag is not None:
            timings["written"].append(1e3 * (flag.released_at.pop(prefetched.ticket) - landing.landed_at))
        for tokens, position, token in zip(lists, landing.positions, landing._tokens, strict=True):
            tokens[position] = token
    sequences.drop(request_ids)
    return timings


if __name__ == "__main__":
    main()
