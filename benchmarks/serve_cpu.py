"""Online serving on the CPU (issue 3): `batchlm serve --device cpu` on a random-weight model of
SmolLM2-135M's shape (float32), loaded by `batchlm bench` with fixed lengths over streaming chat
requests; optionally the offline engine on the same workload (for the HTTP / offline ratio) and any
already-running OpenAI-compatible peer (llama-server, `transformers serve`, ...) in the same run.

    python benchmarks/serve_cpu.py --runs 3 --offline
    python benchmarks/serve_cpu.py --runs 3 --peer llama-server=http://127.0.0.1:8090/v1
    python benchmarks/serve_cpu.py --serve-arg=--max-num-batched-tokens=1024
    # quantized: the same checkpoint as GGUF (benchmarks/gguf_shapes.py), llama-server on the same file
    python benchmarks/serve_cpu.py --runs 3 --concurrency 1 --requests 8 \
        --model-path /tmp/batchlm-serve-cpu/smollm2-135m-q8_0.gguf --peer llama-server=http://127.0.0.1:8090/v1

Every token id decodes to text: the model's byte-level tokenizer is padded with plain words up to
the model's 49152 ids, so TTFT is the first token and a peer given the same files streams the same
amount of text. The prompts are written to a JSONL file per round (random words cut to exactly
--input-len tokens of the model's tokenizer, BOS included) and sent to every server as they are, so
peers whose /tokenize differs from batchlm's get the very same text. Prints one line per run and a
summary of medians; --save writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_vs_mlx_lm_server import free_port, pad_tokenizer_vocab, wait_healthy
from model_shapes import SHAPES, write_random_weights

# What the summary reports from each bench result (vLLM key names).
REPORTED = (
    "output_throughput",
    "median_ttft_ms",
    "median_tpot_ms",
    "median_e2el_ms",
    "duration",
    "server_rss_mib",
)


def build_model(directory: Path, shape: str) -> Path:
    """The random-weight checkpoint (written once, then reused) with its tokenizer padded to the vocab."""
    write_random_weights(shape, directory)
    pad_tokenizer_vocab(directory / "tokenizer.json", SHAPES[shape]["vocab_size"])
    return directory


class LocalTokenCounter:
    """Counts tokens with the model's own tokenizer file, as `batchlm serve`'s /tokenize does."""

    method = "local tokenizer"
    exact = True

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    async def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)


def write_prompts(model_dir: Path, args: argparse.Namespace, seed: int, path: Path) -> Path:
    """`requests` random-word prompts of exactly `input_len` tokens, one JSON object per line.
    Some texts have no prefix of exactly that many tokens (a word that is one token in the padded
    vocabulary can move the count by two), so extra texts are drawn and those that miss are dropped."""
    import random

    from batchlm.bench.datasets import random_samples

    counter = LocalTokenCounter(model_dir)
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(10):
        samples = asyncio.run(random_samples(args.requests, args.input_len, counter, rng))  # type: ignore[arg-type]
        prompts += [sample.prompt for sample in samples if sample.prompt_len == args.input_len]
        if len(prompts) >= args.requests:
            break
    else:
        raise RuntimeError(f"could not cut {args.requests} prompts to exactly {args.input_len} tokens")
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts[: args.requests]))
    return path


def bench_command(base_url: str, model: str, args: argparse.Namespace, out: Path, prompts: Path) -> list[str]:
    return [sys.executable, "-m", "batchlm.cli", "bench", "--base-url", base_url, "--model", model,
            "--stream", "--backend", "openai-chat", "--dataset-name", "jsonl", "--dataset-path", str(prompts),
            "--output-len", str(args.output_len), "--requests", str(args.requests),
            "--concurrency", str(args.concurrency), "--min-delay", "0", "--max-delay", "0",
            "--num-warmups", str(args.warmups), "--disable-tqdm", "--save-result", str(out),
            # A new connection per request for every server: llama-server drops idle keep-alive
            # connections that the client's pool then reuses ("Can not write request body").
            "--header", "Connection=close"]  # fmt: skip


def run_bench(
    base_url: str, model: str, args: argparse.Namespace, out: Path, prompts: Path
) -> dict[str, Any]:
    """One `batchlm bench` run; its saved JSON, with the 1-minute load average at the end added."""
    subprocess.run(bench_command(base_url, model, args, out, prompts), check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())
    if result.get("failed"):
        raise RuntimeError(f"{result['failed']} requests failed: {result.get('failure_reasons')}")
    result["load_average_1m"] = os.getloadavg()[0]
    return result


def run_batchlm_server(
    model_dir: Path, args: argparse.Namespace, scratch: Path, prompts: Path
) -> dict[str, Any]:
    """Start `batchlm serve`, bench it once, stop it with SIGTERM (as an operator would)."""
    port = free_port()
    log = scratch / f"batchlm-{port}.log"
    served = args.model_path or model_dir
    command = [sys.executable, "-m", "batchlm.cli", "serve", "--model", str(served), "--device", "cpu",
               "--port", str(port), "--log-level", "WARNING", *args.serve_arg]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, process, log)
        result = run_bench(
            f"http://127.0.0.1:{port}/v1", str(served), args, scratch / "batchlm.json", prompts
        )
        result["server_rss_mib"] = resident_mib(process.pid)
        return result
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def resident_mib(pid: int) -> float:
    """The server's resident memory (VmRSS) after the run, MiB; the engine core is its child process,
    so both are counted."""
    total_kib = 0
    for child in [pid, *_children(pid)]:
        status = Path(f"/proc/{child}/status")
        if status.exists():
            line = next(
                (ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS:")), "VmRSS: 0 kB"
            )
            total_kib += int(line.split()[1])
    return total_kib / 1024


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = task / "children"
        if children.exists():
            for child in map(int, children.read_text().split()):
                found += [child, *_children(child)]
    return found


def run_offline(model_dir: Path, args: argparse.Namespace, prompt_len: int, seed: int) -> dict[str, Any]:
    """The in-process engine (batchlm.LLM) on the same workload: `requests` prompts of the length the
    server saw, `concurrency` running at a time, exactly `output_len` tokens each, default sampling."""
    import random

    from batchlm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), device="cpu", max_num_seqs=args.concurrency, enable_prefix_caching=False)
    rng = random.Random(seed)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [[rng.randrange(16, vocab) for _ in range(prompt_len)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[: args.warmups or 1], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"output_throughput": tokens / elapsed, "duration": elapsed, "total_output_tokens": tokens,
            "prompt_len": prompt_len, "load_average_1m": os.getloadavg()[0]}  # fmt: skip


def one_round(model_dir: Path, args: argparse.Namespace, round_index: int, work: Path) -> dict[str, Any]:
    """batchlm serve, each peer, and (optionally) the offline engine, the order alternating by round.
    Each round has its own prompts (seed + round), the same for every server: a server that keeps its
    prompt cache between rounds (a peer, which is not restarted) gets no hits from earlier rounds."""
    seed = args.seed + round_index
    prompts = write_prompts(model_dir, args, seed, work / f"prompts-{seed}.jsonl")
    names = ["batchlm", *args.peers]
    if round_index % 2:
        names.reverse()
    results: dict[str, Any] = {}
    for name in names:
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
        if name == "batchlm":
            results[name] = run_batchlm_server(model_dir, args, scratch, prompts)
        else:
            results[name] = run_bench(
                args.peers[name], args.peer_model, args, scratch / f"{name}.json", prompts
            )
        print(f"round {round_index + 1} {name}: {brief(results[name])}", flush=True)
    if args.offline:
        ours = results["batchlm"]
        prompt_len = round(ours["total_input_tokens"] / ours["completed"])
        results["offline"] = run_offline(model_dir, args, prompt_len, seed)
        print(f"round {round_index + 1} offline: {brief(results['offline'])}", flush=True)
    return results


def brief(result: dict[str, Any]) -> str:
    parts = [f"{key}={result[key]:.1f}" for key in REPORTED if key in result]
    return ", ".join([*parts, f"load={result['load_average_1m']:.2f}"])


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median of every reported figure per server, and the HTTP / offline throughput ratio."""
    summary: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        summary[name] = {
            key: statistics.median(r[name][key] for r in rounds) for key in REPORTED if key in rounds[0][name]
        }
    if "offline" in summary:
        ratios = [r["batchlm"]["output_throughput"] / r["offline"]["output_throughput"] for r in rounds]
        summary["batchlm"]["http_over_offline"] = statistics.median(ratios)
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "batchlm-serve-cpu",
                        help="where the model is written (reused) and logs go")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=146)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--warmups", type=int, default=1, help="requests sent first and not measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline", action="store_true", help="also time batchlm.LLM on the same workload")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="extra `batchlm serve` flag (repeat)"
    )
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=BASE_URL",
                        help="an already-running OpenAI-compatible server to bench in the same rounds")  # fmt: skip
    parser.add_argument("--peer-model", default="default", help="model name sent to the peers")
    parser.add_argument("--model-path", type=Path,
                        help="what `batchlm serve --model` gets (e.g. a GGUF file of the shape); default: "
                             "the random safetensors checkpoint, whose tokenizer cuts the prompts either way")  # fmt: skip
    parser.add_argument("--save", type=Path, help="write the summary and every round as JSON")
    args = parser.parse_args(argv)
    try:
        args.peers = dict(peer.split("=", 1) for peer in args.peer)
    except ValueError:
        parser.error("--peer takes NAME=BASE_URL, e.g. llama-server=http://127.0.0.1:8090/v1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir / f"{args.shape}-random", args.shape)
    rounds = [one_round(model_dir, args, index, args.work_dir) for index in range(args.runs)]
    summary = summarize(rounds)
    print(json.dumps(summary, indent=2))
    if args.save:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "cpu_count": os.cpu_count()}
        args.save.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
