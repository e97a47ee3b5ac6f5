"""Test helpers for the bench: the OpenAI stub server from benchmarks/ (single requests against it), a
bench run from command-line words (FAST: the words of a quick run), and a word-counting token counter."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import aiohttp

from batchlm.bench import cli
from batchlm.bench.client import send_request
from batchlm.bench.config import BenchConfig, from_args
from batchlm.bench.openai_format import API_PATHS, Api, EndpointConfig
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.runner import BenchRun, run_benchmark
from batchlm.bench.tokencount import TokenCounter

_STUB_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "openai_stub_server.py"


def _load_stub_module() -> Any:
    name = "openai_stub_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _STUB_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


stub = _load_stub_module()
StubServerThread = stub.StubServerThread
StubOptions = stub.StubOptions


def endpoint_for(base_url: str, api: Api = "chat", stream: bool = True, **changes: Any) -> EndpointConfig:
    return EndpointConfig(url=base_url + API_PATHS[api], api=api, model="stub", stream=stream, **changes)


def send_one(endpoint: EndpointConfig, prompt: str = "hello there", max_tokens: int = 8) -> RequestResult:
    """Sends one request on a fresh session and returns its recorded result."""

    async def go() -> RequestResult:
        result = RequestResult(index=0, spec=RequestSpec(prompt=prompt, max_tokens=max_tokens))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await send_request(session, endpoint, result)
        return result

    return asyncio.run(go())


# A run that wastes no time: streamed, no think time between a user's requests, every prompt once, no
# progress bar.
FAST = ["--stream", "--min-delay", "0", "--max-delay", "0", "--prompt-repeat", "1", "--disable-tqdm"]


def config_for(base_url: str, *argv: str) -> BenchConfig:
    """The bench configuration `batchlm bench --base-url base_url *argv` would run."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return from_args(parser.parse_args(["--base-url", base_url, *argv]))


def bench(base_url: str, *argv: str) -> BenchRun:
    return asyncio.run(run_benchmark(config_for(base_url, *argv), echo=False))


class WordCounter(TokenCounter):
    """Counts one token per word and records how often it was asked."""

    method = "test words"
    exact = True

    def __init__(self) -> None:
        self.calls = 0

    async def count(self, text: str) -> int:
        self.calls += 1
        return len(text.split())
