"""Online serving on the GPU: start `batchlm serve` on a random-weight model of a real shape, time the
command until /health is 200, then run `batchlm bench` in fixed-length mode (all requests at once).

    python benchmarks/serve_gpu.py --shape llama-3.2-1b --requests 256 --input-len 512 --output-len 256
    python benchmarks/serve_gpu.py --runs 0 --server-log start.log --server-log-level INFO  # start-up only
Prints the startup time and the bench JSON summary (vLLM keys); --out-dir keeps the JSON files.
--structured bounded|free puts every request under offline_throughput.py's JSON schema (issue 17, online).
With --server-log the server's output goes to that file, and its `startup:` lines (INFO) are printed.

The model's tokenizer is the small built-in byte-level BPE padded with plain words up to the model's
vocabulary, so every id the random model samples decodes to text (unpadded, ~1.6% of streams at
128k ids sampled only ids past the tokenizer's 2048, streamed no text and counted as failures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_contention import stat_cpu_ticks, stat_fields
from mlx_vs_mlx_lm_server import free_port, pad_tokenizer_vocab
from model_shapes import SHAPES, write_config_only
from structured_outputs import SUMMARY_FIELDS, long_output_schema


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server was not healthy within {timeout_s} s")


SERVER_HISTOGRAMS = {
    "server_ttft_ms": "batchlm_time_to_first_token_seconds",
    "server_queue_ms": "batchlm_request_queue_time_seconds",
    "server_intake_ms": "batchlm_request_intake_seconds",
    "server_e2e_ms": "batchlm_e2e_request_latency_seconds",
}


def histogram_totals(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the server's latency histograms, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals = {}
    for key, name in SERVER_HISTOGRAMS.items():
        values = {}
        for line in text.splitlines():
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix + " "):
                    values[suffix] = float(line.split()[-1])
        totals[key] = (values.get("_sum", 0.0), values.get("_count", 0.0))
    return totals


def server_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean of each histogram over one run (the server's view: from the request's hand-off to the
    engine, after parsing and tokenization, to the first token processed / first scheduled / finish)."""
    means = {}
    for key in SERVER_HISTOGRAMS:
        total = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        means[key] = round(1000 * total / count, 1) if count else float("nan")
    return means


def server_cpu_seconds(root_pid: int) -> dict[int, float]:
    """CPU seconds (user + system) used so far by the server and each of its descendant processes
    (engine core, API servers), by pid; read from /proc (Linux), {} elsewhere."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat_fields(stat)
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = stat_cpu_ticks(fields) / ticks
    tree = {root_pid}
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        grown = bool(children)
        tree |= children
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def cpu_used(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Per-process CPU seconds between two snapshots, largest first (the engine core leads)."""
    return sorted((round(after[pid] - before.get(pid, 0.0), 2) for pid in after), reverse=True)


def prepare_model_dir(shape: str) -> Path:
    """config.json and a tokenizer whose vocabulary covers every id the model can sample."""
    model_dir = write_config_only(shape, Path(tempfile.gettempdir()) / f"batchlm-bench-{shape}")
    pad_tokenizer_vocab(model_dir / "tokenizer.json", SHAPES[shape]["vocab_size"])
    return model_dir


def structured_body(summary_field: str | None) -> list[str]:
    """`batchlm bench` arguments that put every request under the schema (none without one)."""
    if summary_field is None:
        return []
    schema = json.dumps(long_output_schema(summary_field))
    return ["--extra-body", json.dumps({"structured_outputs": {"json": schema}})]


def print_startup_lines(log: Path) -> None:
    """The server's start-up breakdown: its `startup:` log lines, without the timestamp prefix."""
    for line in log.read_text(errors="replace").splitlines():
        # After the logger's name, which may hold the word too (`gpu_startup: startup: ...`).
        if ": startup:" in line:
            print("  " + line[line.index(": startup:") + 2 :], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `batchlm serve` argument")
    parser.add_argument("--bench-arg", action="append", default=[], help="extra `batchlm bench` argument")
    parser.add_argument(
        "--structured",
        choices=sorted(SUMMARY_FIELDS),
        default=None,
        help="every request under offline_throughput.py's ~10-field JSON schema (its last, long field "
        "bounded or free), sent as `structured_outputs`",
    )
    parser.add_argument("--server-log", type=Path, help="write the server's output here (default: inherit)")
    parser.add_argument(
        "--server-log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model_dir = prepare_model_dir(args.shape)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "batchlm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--load-format",
        "dummy",
        "--port",
        str(port),
        "--batch-size",
        str(args.requests),
        "--max-model-len",
        str(args.input_len + args.output_len + 64),
        "--no-prefix-caching",
        "--served-model-name",
        "bench",
        "--max-queue",
        str(4 * args.requests),
        "--log-level",
        args.server_log_level,
        *args.serve_arg,
    ]
    log_file = args.server_log.open("wb") if args.server_log else None
    server = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file else None,
    )
    try:
        ready_s = wait_healthy(port, server, 600)
        print(json.dumps({"command_to_ready_s": round(ready_s, 2), "shape": args.shape}), flush=True)
        if args.server_log:
            print_startup_lines(args.server_log)
        for run in range(args.runs):
            result_path = args.out_dir / f"serve_{args.shape}_run{run}.json"
            before = histogram_totals(port)
            cpu_before = server_cpu_seconds(server.pid)
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
                    "openai",
                    "--stream",
                    "--requests",
                    str(args.requests),
                    "--max-concurrency",
                    str(args.requests),
                    "--input-len",
                    str(args.input_len),
                    "--output-len",
                    str(args.output_len),
                    "--temperature",
                    "1.0",
                    "--num-warmups",
                    "4",
                    "--save-result",
                    str(result_path),
                    "--disable-tqdm",
                    *structured_body(args.structured),
                    *args.bench_arg,
                ],
                check=True,
            )
            result = json.loads(result_path.read_text())
            keys = (
                "completed",
                "failed",
                "duration",
                "output_throughput",
                "median_ttft_ms",
                "median_itl_ms",
                "median_tpot_ms",
            )
            # The bench's warm-up requests fall in this window too (4 of them, short).
            cpu = cpu_used(cpu_before, server_cpu_seconds(server.pid))
            means = server_means(before, histogram_totals(port))
            client = {
                k: result.get(k)
                for k in ("client_cpu_percent", "client_cpu_us_per_output_token", "client_bound")
            }
            print(
                json.dumps(
                    {
                        "run": run,
                        **{k: result.get(k) for k in keys},
                        "mean_ttft_ms": result.get("mean_ttft_ms"),
                        **means,
                        **client,
                        "server_cpu_s": cpu,
                    }
                ),
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
        if log_file is not None:
            log_file.close()


if __name__ == "__main__":
    main()
