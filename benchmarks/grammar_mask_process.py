"""Whether a decode step's grammar masks come sooner from a process of their own than from a thread
beside the engine thread's Python (issue 17): the same llguidance batch (256 rows under the ~10-field
schema, a 128k-id tokenizer) advanced and filled each step, either by a thread of this process or by a
child process, while this process's main thread runs `--engine-python-ms` of plain Python a step as
the engine thread does. Tokens go in and masks come back through shared memory; the time from the
tokens' landing to the masks being written is taken on one clock (CLOCK_MONOTONIC) in both.

    python benchmarks/grammar_mask_process.py --engine-python-ms 0 3.0 --modes thread process

Passes after the first reuse the compiled grammar (warm lexers), as every structured run after an
engine's first does. No model and no GPU: the masks' own latency, GIL included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grammar_host_step import busy_python, pick_tokens, tokenizer_dir
from structured_outputs import SUMMARY_FIELDS, long_output_schema

from batchlm.sampling_params import StructuredOutputs
from batchlm.structured.backend import bitmask_words
from batchlm.structured.factory import mask_threads
from batchlm.structured.llguidance_backend import LLGuidanceBackend
from batchlm.structured.sequences import hand_over_the_gil_sooner

VOCAB = 128256


class MaskStepper:
    """Rows' matchers as a batch: each step advances every row by its token and fills the masks,
    recording when they were written."""

    def __init__(self, rows: int, threads: int, summary_field: str) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(tokenizer_dir(VOCAB))
        self.backend = LLGuidanceBackend.from_hf(hf, VOCAB, (0,), threads=threads, batched_accept=True)
        self.spec = StructuredOutputs(json=json.dumps(long_output_schema(summary_field)))
        self.rows = rows
        self.words = self.backend.bitmask_words
        hand_over_the_gil_sooner()

    def start_pass(self, masks: np.ndarray) -> None:
        self.batch = self.backend.batch([self.backend.matcher(self.spec) for _ in range(self.rows)])
        self.batch.fill(masks)

    def step(self, tokens: np.ndarray, masks: np.ndarray) -> float:
        self.batch.advance_one(tokens.tolist())
        self.batch.fill(masks)
        return time.perf_counter()


def child_main(conn: Connection, rows: int, threads: int, summary_field: str, shm_name: str) -> None:
    """The mask process: per message, a new pass ("start") or a step's tokens in shared memory."""
    stepper = MaskStepper(rows, threads, summary_field)
    shared = SharedMemory(shm_name)
    tokens, masks, written = _views(shared, rows, stepper.words)
    conn.send("ready")
    while (message := conn.recv()) != "stop":
        if message == "start":
            stepper.start_pass(masks)
        else:
            written[0] = stepper.step(tokens, masks)
        conn.send("done")
    del tokens, masks, written
    shared.close()


def _shared_bytes(rows: int, words: int) -> int:
    """The shared memory's layout: tokens [rows] int64, masks [rows, words] int32, the write time."""
    return 8 * rows + 4 * rows * words + 8


def _views(shared: SharedMemory, rows: int, words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.ndarray((rows,), dtype=np.int64, buffer=shared.buf, offset=0)
    masks = np.ndarray((rows, words), dtype=np.int32, buffer=shared.buf, offset=8 * rows)
    written = np.ndarray((1,), dtype=np.float64, buffer=shared.buf, offset=_shared_bytes(rows, words) - 8)
    return tokens, masks, written


class ProcessSide:
    """The masks computed by a child process, through shared memory and a pipe."""

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        words = bitmask_words(VOCAB)
        self.shared = SharedMemory(create=True, size=_shared_bytes(args.rows, words))
        self.tokens, self.masks, self.written = _views(self.shared, args.rows, words)
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=child_main,
            args=(child, args.rows, threads, args.summary_field, self.shared.name),
            daemon=True,
        )
        self.process.start()
        assert self.conn.recv() == "ready"

    def start(self) -> None:
        self.conn.send("start")
        assert self.conn.recv() == "done"

    def step(self, tokens: list[int], engine_ms: float) -> tuple[float, float]:
        self.tokens[:] = tokens
        landed = time.perf_counter()
        self.conn.send("step")
        took = busy_python(engine_ms / 1e3)
        assert self.conn.recv() == "done"
        return 1e3 * (float(self.written[0]) - landed), 1e3 * took

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join(30)
        del self.tokens, self.masks, self.written  # the views must go before the memory is closed
        self.shared.close()
        self.shared.unlink()


class ThreadSide:
    """The masks computed by a thread of this process, as the engine's mask worker does."""

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        self.stepper = MaskStepper(args.rows, threads, args.summary_field)
        self.masks = np.zeros((args.rows, self.stepper.words), dtype=np.int32)
        self.tokens = np.zeros(args.rows, dtype=np.int64)
        self.go, self.done = threading.Event(), threading.Event()
        self.written = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="grammar-masks", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            self.go.wait()
            self.go.clear()
            if self.stopping:
                return
            self.written = self.stepper.step(self.tokens, self.masks)
            self.done.set()

    def start(self) -> None:
        self.stepper.start_pass(self.masks)

    def step(self, tokens: list[int], engine_ms: float) -> tuple[float, float]:
        self.tokens[:] = tokens
        landed = time.perf_counter()
        self.go.set()
        took = busy_python(engine_ms / 1e3)
        self.done.wait()
        self.done.clear()
        return 1e3 * (self.written - landed), 1e3 * took

    def close(self) -> None:
        self.stopping = True
        self.go.set()
        self.thread.join(10)


def run_passes(
    side: ProcessSide | ThreadSide, args: argparse.Namespace, engine_ms: float
) -> list[dict[str, Any]]:
    results = []
    try:
        for run in range(args.passes):
            side.start()
            rng = np.random.default_rng(run)
            written, took = [], []
            for _ in range(args.steps):
                ms_written, ms_took = side.step(pick_tokens(side.masks, rng), engine_ms)
                written.append(ms_written)
                took.append(ms_took)
            warm = slice(args.steps // 5, None)
            results.append(
                {
                    "pass": run,
                    "masks_written_after_tokens_ms_median": round(statistics.median(written[warm]), 3),
                    "engine_python_took_ms_median": round(statistics.median(took[warm]), 3),
                }
            )
    finally:
        side.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--mask-threads", type=int, help="llguidance threads (default: the engine's beside a GPU)"
    )
    parser.add_argument("--engine-python-ms", type=float, nargs="+", default=[0.0, 3.0])
    parser.add_argument("--modes", nargs="+", choices=["thread", "process"], default=["thread", "process"])
    parser.add_argument("--summary-field", choices=sorted(SUMMARY_FIELDS), default="bounded")
    args = parser.parse_args()
    threads = args.mask_threads or mask_threads(on_accelerator=True)
    for engine_ms in args.engine_python_ms:
        busy_python(engine_ms / 1e3)  # calibrated alone, before any mask work runs
    for engine_ms in args.engine_python_ms:
        for mode in args.modes:
            side = ThreadSide(args, threads) if mode == "thread" else ProcessSide(args, threads)
            for result in run_passes(side, args, engine_ms):
                line = {
                    "mode": mode,
                    "engine_python_ms": engine_ms,
                    "mask_threads": threads,
                    "rows": args.rows,
                }
                print(json.dumps(line | result), flush=True)


if __name__ == "__main__":
    main()
