"""Benchmark `batchlm serve --backend mlx` against `mlx_lm.server`: same model, same load generator
(`batchlm bench`), same machine; output tokens/s at several concurrency levels, median of N runs.

The model is a random-weight checkpoint of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads over 3 KV
heads, intermediate 1536, tied 49152-token vocabulary) with the built-in byte-level tokenizer, whose
vocabulary is padded with plain ASCII words up to 49152 ids so that every id the model emits decodes to
text for both servers. Both servers stay up for the whole benchmark (the idle one waits on its queue)
and every run measures each level on the two back to back, in alternating order, so that a pair sees
the same machine even when other work comes and goes. Usage:

    python benchmarks/mlx_vs_mlx_lm_server.py --concurrency 1,4,16 --runs 3 --save result.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

SMOLLM2_135M_SHAPE = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
SERVERS = ("batchlm", "mlx_lm")
HEALTHY_WITHIN_S = 300.0


def build_model(directory: Path) -> Path:
    """Write the random-weight model and its padded tokenizer once; later runs reuse the directory."""
    from batchlm.models.random_model import write_random_model
    from batchlm.tokenizer.builder import build_tokenizer

    if (directory / "tokenizer.json").exists():
        return directory
    write_random_model(directory, "llama", overrides=SMOLLM2_135M_SHAPE, seed=0)
    build_tokenizer(directory)
    pad_tokenizer_vocab(directory / "tokenizer.json", SMOLLM2_135M_SHAPE["vocab_size"])
    return directory


def pad_tokenizer_vocab(path: Path, vocab_size: int) -> None:
    """Append " aa", " ab", ... (byte-level BPE spelling, no merges) until the vocabulary has vocab_size ids."""
    data = json.loads(path.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    words = (
        "Ġ" + "".join(letters)
        for n in itertools.count(2)
        for letters in itertools.product(string.ascii_lowercase, repeat=n)
    )
    next_id = len(vocab)
    while next_id < vocab_size:
        word = next(words)
        if word not in vocab:
            vocab[word] = next_id
            next_id += 1
    path.write_text(json.dumps(data))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(kind: str, model_dir: Path, port: int, batch_size: int) -> list[str]:
    if kind == "batchlm":
        return [sys.executable, "-m", "batchlm.cli", "serve", "--backend", "mlx", "--model", str(model_dir),
                "--port", str(port), "--batch-size", str(batch_size), "--log-level", "WARNING"]  # fmt: skip
    return [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port),
            "--decode-concurrency", str(batch_size), "--log-level", "WARNING"]  # fmt: skip


def wait_healthy(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server on port {port} not healthy within {HEALTHY_WITHIN_S:.0f} s")


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, args.requests_per_user * concurrency)


def write_prompts(path: Path, count: int, words: int, seed: int) -> Path:
    """`count` distinct prompts of random words, one JSON string a line: no prompt repeats across runs,
    so neither server's prompt cache (whose sizes differ) can serve a measured prefill."""
    from batchlm.bench.words import VOCABULARY

    rng = random.Random(seed)
    lines = [json.dumps(" ".join(rng.choice(VOCABULARY) for _ in range(words))) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_level(
    port: int, model: str, concurrency: int, args: argparse.Namespace, prompts: Path, out: Path
) -> dict[str, Any]:
    """One `batchlm bench` run at a fixed concurrency; returns its saved result."""
    command = [sys.executable, "-m", "batchlm.cli", "bench", "--base-url", f"http://127.0.0.1:{port}/v1",
               "--model", model, "--stream", "--concurrency", str(concurrency),
               "--requests", str(requests_at(concurrency, args)), "--output-len", str(args.output_len),
               "--dataset-name", "jsonl", "--dataset-path", str(prompts), "--temperature", str(args.temperature),
               "--min-delay", "0", "--max-delay", "0", "--seed", "0", "--num-warmups", "1",
               "--disable-tqdm", "--save-result", str(out)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    result: dict[str, Any] = results[0] if isinstance(results, list) else results
    return result


class Server:
    """One server subprocess on a free port; stopped with SIGTERM, as an operator would."""

    def __init__(self, kind: str, model_dir: Path, batch_size: int, scratch: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = scratch / f"{kind}-{self.port}.log"
        command = server_command(kind, model_dir, self.port, batch_size)
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        wait_healthy(self.port, self.process, self.log)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def measure(
    servers: list[Server], model_dir: Path, args: argparse.Namespace, scratch: Path
) -> dict[str, list[dict[int, dict[str, Any]]]]:
    """Every run measures each level on every server back to back (order alternating), so the two
    servers of a pair see the same machine; the idle server waits on its request queue meanwhile."""
    runs: dict[str, list[dict[int, dict[str, Any]]]] = {server.kind: [] for server in servers}
    for run_index in range(args.runs):
        for server in servers:
            runs[server.kind].append({})
        for level_index, level in enumerate(args.levels):
            order = servers if (run_index + level_index) % 2 == 0 else servers[::-1]
            # The same fresh prompts for both servers of the pair (+1 for the warm-up request).
            prompts = write_prompts(
                scratch / f"prompts-run{run_index}-c{level}.jsonl",
                requests_at(level, args) + 1,
                args.prompt_words,
                seed=1000 * run_index + level,
            )
            for server in order:
                out = scratch / f"{server.kind}-run{run_index}-c{level}.json"
                result = bench_level(server.port, str(model_dir), level, args, prompts, out)
                runs[server.kind][-1][level] = result
                print(f"run {run_index + 1}/{args.runs} c={level} {server.kind}: "
                      f"{result['output_throughput']:.2f} tok/s", flush=True)  # fmt: skip
    return runs


def summarize(runs: dict[str, list[dict[int, dict[str, Any]]]], levels: list[int]) -> list[dict[str, Any]]:
    """Per level: each server's median output tok/s over the runs, and batchlm / mlx_lm."""
    rows = []
    for level in levels:
        row: dict[str, Any] = {"concurrency": level}
        for kind, measured in runs.items():
            values = [run[level]["output_throughput"] for run in measured]
            row[kind] = {"median_tok_s": statistics.median(values), "runs_tok_s": values,
                         "output_tokens": [run[level]["total_output_tokens"] for run in measured]}  # fmt: skip
        if all(kind in row for kind in SERVERS):
            row["ratio"] = row["batchlm"]["median_tok_s"] / row["mlx_lm"]["median_tok_s"]
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| concurrency | batchlm --backend mlx (tok/s) | mlx_lm.server (tok/s) | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for row in rows:
        ours, theirs = row.get("batchlm", {}), row.get("mlx_lm", {})
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
        print(
            f"| {row['concurrency']} | {ours.get('median_tok_s', 0):.2f} | {theirs.get('median_tok_s', 0):.2f} | {ratio} |"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "batchlm-mlx-bench",
                        help="where the model is written (reused) and logs go")  # fmt: skip
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--runs", type=int, default=3, help="runs per server; the median is reported")
    parser.add_argument("--servers", default=",".join(SERVERS), help="which of batchlm,mlx_lm to run")
    parser.add_argument("--output-len", type=int, default=32, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--prompt-words", type=int, default=24, help="random words per prompt")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sent with every request (the servers' defaults differ: 1.0 and 0.0)")  # fmt: skip
    parser.add_argument(
        "--requests-per-user", type=int, default=2, help="requests per level = this x concurrency"
    )
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument("--batch-size", type=int, default=32, help="both servers' running-batch cap")
    parser.add_argument("--save", type=Path, help="write the summary and every run as JSON")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM to the benchmark still stops both servers (the finally below runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    kinds = [kind for kind in args.servers.split(",") if kind]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir / "smollm2-135m-shape-random")
    scratch = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work_dir))
    servers = [Server(kind, model_dir, args.batch_size, scratch) for kind in kinds]
    try:
        for server in servers:
            server.wait_healthy()
        runs = measure(servers, model_dir, args, scratch)
    finally:
        exit_codes = {server.kind: server.stop() for server in servers}
    print(f"server exit codes after SIGTERM: {exit_codes}")
    rows = summarize(runs, args.levels)
    print_table(rows)
    if args.save:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()}  # fmt: skip
        args.save.write_text(
            json.dumps(
                {"meta": meta, "summary": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
