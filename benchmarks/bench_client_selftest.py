"""Self-test of the benchmark client: how many streamed tokens/s it sustains against the fast stub server.

Starts benchmarks/openai_stub_server.py in its own process (so it gets its own core), then runs the
`batchlm bench` client in this process N times and prints each run and the median. The stub streams one
token per SSE chunk by default, the client's worst case (one JSON parse per token).

    python benchmarks/bench_client_selftest.py [--runs 3] [--requests 256] [--concurrency 64] [--output-len 1000]
        [--itl-ms 2.5]   # pace the stub: 64 streams x 400 tokens/s = 25,600 tokens/s offered
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from batchlm.bench import cli
from batchlm.bench.config import from_args
from batchlm.bench.report import LevelReport
from batchlm.bench.runner import run_benchmark

STUB = Path(__file__).resolve().parent / "openai_stub_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_stub(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        str(STUB),
        "--port",
        str(port),
        "--tokens-per-chunk",
        str(args.tokens_per_chunk),
        "--itl-ms",
        str(args.itl_ms),
        "--events-per-write",
        str(args.events_per_write),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the stub server did not start within 20 s")


def run_once(base_url: str, args: argparse.Namespace) -> LevelReport:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    argv = [
        "--base-url",
        base_url,
        "--stream",
        "--concurrency",
        str(args.concurrency),
        "--requests",
        str(args.requests),
        "--min-delay",
        "0",
        "--max-delay",
        "0",
        "--output-len",
        str(args.output_len),
        "--prompt-repeat",
        "1",
        "--disable-tqdm",
    ]
    config = from_args(parser.parse_args(argv))
    return asyncio.run(run_benchmark(config, echo=False)).levels[0]


def describe(level: LevelReport) -> str:
    m, check = level.metrics, level.check
    chunks = sum(len(r.chunk_times) for r in level.outcome.results)
    return (
        f"{m.output_throughput:9.0f} tok/s  {chunks / m.duration_s:9.0f} chunks/s  ok {m.completed} failed {m.failed}"
        f"  client CPU {check.cpu_percent:5.1f}%  {check.cpu_s / max(1, m.total_output_tokens) * 1e6:5.1f} us/token"
        f"  loop lag p99 {check.loop_lag_p99_s * 1e3:6.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=1000)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument(
        "--itl-ms", type=float, default=0.0, help="stub pacing per token and stream (0 = flood)"
    )
    parser.add_argument("--events-per-write", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    stub = start_stub(port, args)
    try:
        print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
        if args.itl_ms > 0:
            offered = args.concurrency * 1000 / args.itl_ms
            print(f"stub paced at {args.itl_ms} ms per token per stream: {offered:.0f} tokens/s offered")
        levels = []
        for run in range(1, args.runs + 1):
            levels.append(run_once(f"http://127.0.0.1:{port}/v1", args))
            print(f"run {run}: {describe(levels[-1])}", flush=True)
        median = statistics.median(level.metrics.output_throughput for level in levels)
        cpu = statistics.median(level.check.cpu_percent for level in levels)
        print(f"median of {args.runs}: {median:.0f} streamed tokens/s, client CPU {cpu:.1f}% of one core")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        stub.terminate()
        stub.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
