"""How long a plain stream stops while the server compiles a large JSON schema beside it: starts
`batchlm serve` on the CPU, streams one plain completion, and once it runs sends one chat request under
a schema of N required integer properties (fresh names each run, so no cache serves it). Reports the
plain stream's longest gap between tokens before the schema request and while it runs.

    python benchmarks/grammar_compile_stall.py --properties 3000
    python benchmarks/grammar_compile_stall.py --properties 4000 --src /path/to/other/tree/src  # A/B
    python benchmarks/grammar_compile_stall.py --cold   # the grammar backend is built by this request too

The schema's properties are required: optional ones past llguidance's 2,000 items a parser row fail
at the first token, which measures a failure, not a compile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

DEFAULT_MODEL = Path.home() / ".cache/batchlm/default-model/SmolLM2-135M-Instruct.Q4_1.gguf"


def start_server(model: str, port: int, src: str | None, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=src) if src else None
    command = [
        sys.executable,
        "-m",
        "batchlm",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_healthy(base: str, server: subprocess.Popen[bytes]) -> None:
    while server.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server exited before it was ready")


def stream_plain(base: str, model: str, max_tokens: int, times: list[float]) -> None:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())


def warm_up(base: str, model: str) -> None:
    warm = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "response_format": {"type": "json_object"},
    }
    httpx.post(f"{base}/v1/chat/completions", json=warm, timeout=600).raise_for_status()


def measure(base: str, properties: int, plain_tokens: int, cold: bool) -> dict[str, object]:
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    if not cold:  # the grammar backend (its tokenizer) is built on the first constrained request
        warm_up(base, model)
    times: list[float] = []
    plain = threading.Thread(target=stream_plain, args=(base, model, plain_tokens, times))
    plain.start()
    while len(times) < 30 and plain.is_alive():
        time.sleep(0.01)
    tag = uuid.uuid4().hex[:6]
    names = [f"{tag}_p{i}" for i in range(properties)]
    schema = {"type": "object", "properties": {n: {"type": "integer"} for n in names}, "required": names}
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "JSON"}],
        "max_tokens": 10,
        "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}},
    }
    sent = time.perf_counter()
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    done = time.perf_counter()
    plain.join()
    gaps = [(later - earlier, earlier) for earlier, later in itertools.pairwise(times)]
    before = [gap for gap, at in gaps if at < sent]
    during = [gap for gap, at in gaps if sent <= at <= done]
    return {
        "properties": properties,
        "schema_request_s": round(done - sent, 2),
        "schema_status": reply.status_code,
        "plain_longest_gap_before_s": round(max(before), 3),
        "plain_longest_gap_during_s": round(max(during), 3) if during else None,
        "plain_tokens_during": len(during),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--properties", type=int, default=3000)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--port", type=int, default=8977)
    parser.add_argument("--plain-tokens", type=int, default=600)
    parser.add_argument(
        "--cold", action="store_true", help="no constrained request first: the backend is built too"
    )
    parser.add_argument("--src", help="a source tree's src/ to serve from (PYTHONPATH), for A/B runs")
    args = parser.parse_args()
    log = Path(f"grammar_compile_stall_{args.port}.log")
    server = start_server(args.model, args.port, args.src, log)
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_healthy(base, server)
        print(
            json.dumps(
                {
                    "src": args.src or "installed",
                    **measure(base, args.properties, args.plain_tokens, args.cold),
                }
            )
        )
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
