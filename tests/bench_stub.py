"""Test helper: loads the OpenAI stub server from benchmarks/ and runs single requests against it."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

import aiohttp

from batchlm.bench.client import send_request
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.records import RequestResult, RequestSpec

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


def endpoint_for(base_url: str, chat: bool = True, stream: bool = True, **changes: Any) -> EndpointConfig:
    path = "/chat/completions" if chat else "/completions"
    return EndpointConfig(url=base_url + path, chat=chat, model="stub", stream=stream, **changes)


def send_one(endpoint: EndpointConfig, prompt: str = "hello there", max_tokens: int = 8) -> RequestResult:
    """Sends one request on a fresh session and returns its recorded result."""

    async def go() -> RequestResult:
        result = RequestResult(index=0, spec=RequestSpec(prompt=prompt, max_tokens=max_tokens))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await send_request(session, endpoint, result)
        return result

    return asyncio.run(go())
