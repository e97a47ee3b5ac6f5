"""How fast can the server's front end go? The real `batchlm serve` app and front end, fed by an engine
core whose model runner is replaced by a timing model of a GPU step (no model, no device).

The engine core is the real one (scheduler, async scheduling, pipe protocol); only the executor is
simulated: each step "runs" for `--step-base-ms + --decode-row-us * rows + --prefill-token-us *
prefill tokens` after the previous one ends, and samples random ids of the tokenizer. The defaults
model the W1 workload on one H100 (a 256-row decode step of the Llama-3.2-1B shape ~5.3 ms; 131k
prefill tokens ~0.4 s). The script measures the simulated engine alone (offline: the ceiling), then
the same workload through HTTP with `batchlm bench`, and prints the ratio and the CPU time per output
token of the front end and of the bench client (its start-up included). The front end's figure includes
the bench client's prompt fitting (a few /tokenize calls a prompt, before the burst); its part after
the last /tokenize answer (the burst: intake, streaming and the warm-up requests) is printed too. It runs on a CPU-only machine, so front-end work can be profiled without a GPU.

    python benchmarks/frontend_capacity.py --requests 256 --input-len 512 --output-len 256 --runs 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_vs_mlx_lm_server import free_port
from model_shapes import SHAPES, write_config_only
from serve_gpu import histogram_totals, server_means

from batchlm.config import EngineConfig
from batchlm.core.engine_core import EngineCore
from batchlm.core.facts import ModelFacts
from batchlm.core.step_io import ModelRunnerOutput, SchedulerOutput
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.executor.core_builder import build_scheduler
from batchlm.executor.core_messages import CoreReady
from batchlm.executor.core_process import CoreLoop
from batchlm.request import EngineCoreRequest
from batchlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepTiming:
    """Modelled duration of one engine step on the device."""

    base_ms: float
    decode_row_us: float
    prefill_token_us: float

    def seconds(self, scheduled: SchedulerOutput) -> float:
        decode_rows = sum(1 for c in scheduled.chunks if len(c.token_ids) == 1)
        prefill_tokens = scheduled.num_tokens - decode_rows
        return (
            self.base_ms * 1e3 + self.decode_row_us * decode_rows + self.prefill_token_us * prefill_tokens
        ) / 1e6


class _Pending:
    def __init__(self, output: ModelRunnerOutput, done_at: float) -> None:
        self._output = output
        self._done_at = done_at

    def result(self) -> ModelRunnerOutput:
        delay = self._done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self._output


class SimulatedExecutor:
    """Stands in for the model runner: steps queue back to back like kernels on one GPU stream."""

    def __init__(self, timing: StepTiming, vocab_size: int, seed: int = 0) -> None:
        self.timing = timing
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)
        self._device_free_at = 0.0

    def execute_async(self, scheduled: SchedulerOutput) -> _Pending:
        start = max(time.perf_counter(), self._device_free_at)
        self._device_free_at = start + self.timing.seconds(scheduled)
        sampled = [c.request_id for c in scheduled.chunks if c.sample]
        # Ids from 3 up: the tokenizer's specials (0-2) would end or hide the text.
        tokens = tuple(self._rng.randrange(3, self.vocab_size) for _ in sampled)
        output = ModelRunnerOutput(tuple(sampled), tokens, tuple(None for _ in sampled))
        return _Pending(output, self._device_free_at)

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(scheduled).result()


def build_simulated_core(
    config: EngineConfig, timing: StepTiming, vocab_size: int
) -> tuple[EngineCore, ModelFacts]:
    info = ModelFacts(
        max_model_len=config.max_model_len or 2048,
        vocab_size=vocab_size,
        num_blocks=1 << 16,
        block_size=16,
        max_num_batched_tokens=config.max_num_batched_tokens or 8192,
        device="simulated",
        dtype="bfloat16",
    )
    return EngineCore(
        build_scheduler(config, info), SimulatedExecutor(timing, vocab_size), async_scheduling=True
    ), info


def simulated_core_main(config: EngineConfig, conn: Connection, timing: StepTiming, vocab_size: int) -> None:
    core, info = build_simulated_core(config, timing, vocab_size)
    conn.send(CoreReady(info))
    CoreLoop(core, conn).run()


class SimulatedEngine(AsyncLLMEngine):
    """The real front end, spawning the simulated core instead of loading a model."""

    timing: StepTiming
    vocab_size: int

    def _spawn_core(self, model_dir: Any) -> Connection:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=simulated_core_main, args=(self.config, child, self.timing, self.vocab_size), daemon=True
        )
        process.start()
        child.close()
        self._worker = process
        return parent


def run_offline(config: EngineConfig, timing: StepTiming, vocab_size: int, args: argparse.Namespace) -> float:
    """Output tokens/s of the simulated engine with every request added at once (no front end)."""
    core, _ = build_simulated_core(config, timing, vocab_size)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0)
    for index in range(args.requests):
        prompt = tuple(rng.randrange(3, vocab_size) for _ in range(args.input_len))
        core.add_request(
            EngineCoreRequest(
                request_id=str(index),
                prompt_token_ids=prompt,
                sampling_params=params,
                eos_token_ids=(2,),
                arrival_time=time.time(),
            )
        )
    started = time.perf_counter()
    tokens = 0
    while core.has_work():
        tokens += sum(len(o.new_token_ids) for o in core.step())
    return tokens / (time.perf_counter() - started)


class LastTokenizeMark:
    """ASGI middleware: this process's CPU usage as the last /tokenize answer went out."""

    usage: resource.struct_rusage | None = None

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope["path"].endswith("/tokenize"):
            LastTokenizeMark.usage = resource.getrusage(resource.RUSAGE_SELF)


def serve_in_thread(config: EngineConfig, port: int, engine: SimulatedEngine) -> threading.Thread:
    from batchlm.server.app import build_app
    from batchlm.server.launcher import run_server
    from batchlm.server.state import ServerSettings

    settings = ServerSettings(port=port, max_queue=4 * config.max_num_seqs, log_level="WARNING")
    app = build_app(engine, settings)
    app.add_middleware(LastTokenizeMark)
    thread = threading.Thread(
        target=run_server, args=(app, engine), kwargs={"start_engine": engine.start}, daemon=True
    )
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step-base-ms", type=float, default=2.0)
    parser.add_argument("--decode-row-us", type=float, default=13.0)
    parser.add_argument("--prefill-token-us", type=float, default=3.0)
    parser.add_argument("--endpoint", choices=("completions", "chat", "responses"), default="completions")
    parser.add_argument("--bench-arg", action="append", default=[], help="extra `batchlm bench` argument")
    args = parser.parse_args()

    timing = StepTiming(args.step_base_ms, args.decode_row_us, args.prefill_token_us)
    model_dir = write_config_only("tiny", Path(tempfile.gettempdir()) / "batchlm-bench-tiny")
    vocab_size = SHAPES["tiny"]["vocab_size"]
    config = EngineConfig(
        model=str(model_dir),
        max_num_seqs=args.requests,
        max_model_len=args.input_len + args.output_len + 64,
        served_model_name="bench",
        enable_prefix_caching=False,
        # The simulated executor samples one token a row and verifies no drafts.
        speculative="off",
    )
    offline = statistics.median(run_offline(config, timing, vocab_size, args) for _ in range(2))
    print(json.dumps({"offline_output_tok_s": round(offline)}), flush=True)

    SimulatedEngine.timing = timing
    SimulatedEngine.vocab_size = vocab_size
    engine = SimulatedEngine(config, max_queue=4 * args.requests)
    port = free_port()
    serve_in_thread(config, port, engine)
    deadline = time.time() + 60
    while not engine.is_ready:
        if time.time() > deadline:
            raise TimeoutError("the server did not start")
        time.sleep(0.1)
    online = []
    for run in range(args.runs):
        result_path = Path(tempfile.gettempdir()) / f"frontend_capacity_run{run}.json"
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        histograms_before = histogram_totals(port)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "batchlm.cli",
                "bench",
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--model",
                "bench",
                "--backend",
                {"completions": "openai", "chat": "openai-chat", "responses": "openai-responses"}[
                    args.endpoint
                ],
                "--stream",
                "--requests",
                str(args.requests),
                "--max-concurrency",
                str(args.requests),
                "--input-len",
                str(args.input_len),
                "--output-len",
                str(args.output_len),
                "--num-warmups",
                "4",
                "--save-result",
                str(result_path),
                "--disable-tqdm",
                *args.bench_arg,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = _cpu_seconds(cpu_after, cpu_before)
        # The bench client fits each prompt's length through /tokenize first: without a call in this
        # run (another client), the whole run counts as the burst.
        fitted = LastTokenizeMark.usage or cpu_before
        burst_cpu_s = _cpu_seconds(cpu_after, max(fitted, cpu_before, key=_cpu_seconds_total))
        # The bench process, the only child waited for (the simulated core runs on): start-up included.
        client_cpu_s = _cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN), client_before)
        result = json.loads(result_path.read_text())
        tokens = result["total_output_tokens"]
        online.append(result["output_throughput"])
        print(
            json.dumps(
                {
                    "run": run,
                    "completed": result["completed"],
                    "output_tok_s": round(result["output_throughput"]),
                    "ratio_to_offline": round(result["output_throughput"] / offline, 3),
                    "median_ttft_ms": round(result["median_ttft_ms"], 1),
                    "median_tpot_ms": round(result["median_tpot_ms"], 2),
                    **server_means(histograms_before, histogram_totals(port)),
                    "front_end_cpu_us_per_token": round(cpu_s / tokens * 1e6, 1),
                    "front_end_burst_cpu_us_per_token": round(burst_cpu_s / tokens * 1e6, 1),
                    "client_cpu_us_per_token": round(client_cpu_s / tokens * 1e6, 1),
                }
            ),
            flush=True,
        )
    print(
        json.dumps(
            {
                "median_online_tok_s": round(statistics.median(online)),
                "median_ratio": round(statistics.median(online) / offline, 3),
            }
        ),
        flush=True,
    )


def _cpu_seconds(after: resource.struct_rusage, before: resource.struct_rusage) -> float:
    return _cpu_seconds_total(after) - _cpu_seconds_total(before)


def _cpu_seconds_total(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
