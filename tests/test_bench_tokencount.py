"""Which /tokenize form the bench trusts: a server that ignores the field must not count 0 tokens."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.tokencount import make_counter


def _llama_cpp_tokenize_app(seen: list[dict[str, Any]]) -> web.Application:
    """llama-server's /tokenize: reads "content" and answers {"tokens": []} to a body without it."""

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        words = str(body.get("content", "")).split()
        return web.json_response({"tokens": list(range(len(words)))})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    return app


def test_llama_cpp_tokenize_is_asked_with_content_instead_of_counting_zero() -> None:
    seen: list[dict[str, Any]] = []

    async def go() -> tuple[str, int]:
        async with TestServer(_llama_cpp_tokenize_app(seen)) as server, aiohttp.ClientSession() as session:
            url = str(server.make_url("/tokenize"))
            endpoint = EndpointConfig(url=url, api="chat", model="m", stream=True)
            counter = await make_counter(session, url, endpoint)
            return counter.method, await counter.count("one two three four")

    method, count = asyncio.run(go())
    assert (method, count) == ("tokenize endpoint", 4)
    assert seen[0] == {"prompt": "hello world"}  # vLLM's form first; it counted 0 here
    assert seen[-1] == {"content": "one two three four", "add_special": True}


def test_generated_text_is_counted_without_special_tokens() -> None:
    """Output without usage is counted by /tokenize in the form that counts, with no BOS added."""
    from batchlm.bench.records import RequestResult, RequestSpec
    from batchlm.bench.tokencount import OutputTokenCounting

    seen: list[dict[str, Any]] = []
    done = RequestResult(index=0, spec=RequestSpec("p", 8), generated_text="one two three")
    reported = RequestResult(
        index=1, spec=RequestSpec("p", 8), generated_text="a b", usage_completion_tokens=2
    )
    failed = RequestResult(index=2, spec=RequestSpec("p", 8), generated_text="a b", error="HTTP 500")

    async def go() -> int:
        async with TestServer(_llama_cpp_tokenize_app(seen)) as server, aiohttp.ClientSession() as session:
            counting = OutputTokenCounting(session, str(server.make_url("/tokenize")), {})
            return await counting.count([done, reported, failed])

    assert asyncio.run(go()) == 1
    assert (done.counted_completion_tokens, reported.counted_completion_tokens) == (3, None)
    assert failed.counted_completion_tokens is None
    assert seen[0] == {"prompt": "hello world", "add_special_tokens": False}  # counted 0 here
    assert seen[-1] == {"content": "one two three", "add_special": False}
