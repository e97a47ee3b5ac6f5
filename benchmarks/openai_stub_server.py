"""A tiny, fast OpenAI-compatible stub server that exists only to test and stress the benchmark client.

It generates no text: every request streams exactly max_tokens fake tokens as fast as allowed (or paced
by --ttft-ms / --itl-ms), with realistic vLLM-shaped chunks. Prompts may carry fault markers such as
"FAULT:http_500" so tests can check how the client counts failures. Raw asyncio, no web framework, so
the stub costs little CPU next to the client it measures.

    python benchmarks/openai_stub_server.py --port 8001 [--tokens-per-chunk 1] [--itl-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

FAULTS = (
    "no_stream",
    "http_500",
    "inband_error",
    "truncate",
    "disconnect",
    "empty",
    "keepalive",
    "bad_json",
    "event_error",
)
# Tokens the stub pretends the chat template adds to a prompt (visible in usage.prompt_tokens).
CHAT_TEMPLATE_TOKENS = 5
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class StubOptions:
    """How the stub answers."""

    # Fake tokens per content chunk (the usage still counts every token).
    tokens_per_chunk: int = 1
    # Delay before the first content chunk, and between chunks, in seconds.
    ttft_s: float = 0.0
    itl_s: float = 0.0
    # Serve POST /tokenize (batchlm's and vLLM's token-count endpoint).
    tokenize: bool = True
    # Put cumulative usage in every content chunk (like vLLM's continuous_usage_stats).
    usage_per_chunk: bool = False
    # Content events per network write (fewer syscalls keep the stub cheap, so that what is measured is
    # the client); with itl_s, a batch is followed by a pause of itl_s per event. Every token is still
    # its own SSE event.
    events_per_write: int = 8
    # The context length: listed in /v1/models when set, and a request whose prompt and max_tokens
    # exceed it gets a 400, as from a real server.
    max_model_len: int | None = None


@dataclass
class StubStats:
    """What the stub saw (for tests of the client's connection use)."""

    connections: int = 0
    # Completion requests that were the first request on their connection.
    completions_on_new_connections: int = 0
    completions: int = 0


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection: parses requests, writes responses."""

    def __init__(self, options: StubOptions, stats: StubStats) -> None:
        self.options = options
        self.stats = stats
        self.requests = 0
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buffer[:head_end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < head_end + 4 + length:
            return
        body = self.buffer[head_end + 4 : head_end + 4 + length]
        self.buffer = self.buffer[head_end + 4 + length :]
        method, path, _ = head[0].split(" ", 2)
        if path in ("/v1/chat/completions", "/v1/completions"):
            self.stats.completions += 1
            self.stats.completions_on_new_connections += self.requests == 0
        self.requests += 1
        self.busy = True
        asyncio.get_running_loop().create_task(self._serve(method, path, body))

    async def _serve(self, method: str, path: str, body: bytes) -> None:
        try:
            await route(self, method, path, body)
        finally:
            self.busy = False
            if self.transport is not None and self.buffer:
                self._next_request()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}.get(
            status, "Error"
        )
        self.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    async def write_chunk(self, data: bytes) -> None:
        """One HTTP chunk (chunked transfer encoding), waiting while the client is not reading."""
        self.write(b"%x\r\n%s\r\n" % (len(data), data))
        if not self.can_write.is_set():
            await self.can_write.wait()


async def route(conn: _Connection, method: str, path: str, body: bytes) -> None:
    if method == "GET" and path in ("/v1/models", "/health"):
        card: dict[str, Any] = {"id": "stub-model", "object": "model"}
        if conn.options.max_model_len is not None:
            card["max_model_len"] = conn.options.max_model_len
        conn.write_json(200, {"object": "list", "data": [card]})
    elif method == "POST" and path == "/tokenize" and conn.options.tokenize:
        prompt = json.loads(body).get("prompt", "")
        count = len(prompt.split())
        conn.write_json(200, {"count": count, "tokens": list(range(count)), "max_model_len": 1 << 20})
    elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
        await _completion(conn, json.loads(body), chat=path.endswith("chat/completions"))
    else:
        conn.write_json(404, {"error": {"message": f"no route {method} {path}", "code": 404}})


def _fault(prompt: str) -> str | None:
    marker = prompt.find("FAULT:")
    if marker < 0:
        return None
    name = prompt[marker + len("FAULT:") :].split()[0]
    if name not in FAULTS:
        raise ValueError(f"unknown stub fault {name!r}; known: {', '.join(FAULTS)}")
    return name


async def _completion(conn: _Connection, request: dict[str, Any], chat: bool) -> None:
    prompt = request["messages"][-1]["content"] if chat else request["prompt"]
    try:
        fault = _fault(prompt)
    except ValueError as exc:  # answered, or the client would wait out its timeout on a typo
        conn.write_json(400, {"error": {"message": str(exc), "code": 400}})
        return
    if fault == "http_500":
        conn.write_json(500, {"error": {"message": "stub fault: internal error", "code": 500}})
        return
    prompt_tokens = len(prompt.split()) + (CHAT_TEMPLATE_TOKENS if chat else 0)
    max_tokens = int(request.get("max_tokens") or 16)
    context = conn.options.max_model_len
    if context is not None and prompt_tokens + max_tokens > context:
        message = (
            f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the {context}-token context"
        )
        conn.write_json(400, {"error": {"message": message, "code": 400}})
        return
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": max_tokens,
        "total_tokens": prompt_tokens + max_tokens,
    }
    if not request.get("stream") or fault == "no_stream":
        text = " tok" * max_tokens
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if chat
            else {"index": 0, "text": text}
        )
        conn.write_json(
            200,
            {
                "id": "stub",
                "object": "chat.completion" if chat else "text_completion",
                "model": request.get("model"),
                "choices": [{**choice, "finish_reason": "length"}],
                "usage": usage,
            },
        )
        return
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    await _stream(conn, request, chat, fault, max_tokens, usage if include_usage else None)


async def _stream(
    conn: _Connection,
    request: dict[str, Any],
    chat: bool,
    fault: str | None,
    max_tokens: int,
    usage: dict[str, int] | None,
) -> None:
    options = conn.options
    conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = json.dumps(
        {"id": "chatcmpl-stub", "object": kind, "created": int(time.time()), "model": request.get("model")}
    )
    head = head[:-1] + ', "choices": [{"index": 0, '
    if chat:
        await conn.write_chunk(
            f'data: {head}"delta": {{"role": "assistant", "content": ""}}, "finish_reason": null}}]}}\n\n'.encode()
        )
    if options.ttft_s:
        await asyncio.sleep(options.ttft_s)
    chunks = 0 if fault == "empty" else -(-max_tokens // options.tokens_per_chunk)
    batch: list[bytes] = []
    clock = asyncio.get_running_loop().time
    due = clock()
    for index in range(chunks):
        if fault is not None and await _inject_fault(conn, fault, index, chunks):
            return
        sent = min(max_tokens, (index + 1) * options.tokens_per_chunk)
        text = " tok" * (sent - index * options.tokens_per_chunk)
        delta = f'"delta": {{"content": "{text}"}}' if chat else f'"text": "{text}"'
        tail = (
            f', "usage": {{"prompt_tokens": 0, "completion_tokens": {sent}}}'
            if options.usage_per_chunk
            else ""
        )
        batch.append(f'data: {head}{delta}, "logprobs": null, "finish_reason": null}}]{tail}}}\n\n'.encode())
        if fault or len(batch) >= options.events_per_write or index == chunks - 1:
            await conn.write_chunk(b"".join(batch))
            # Paced against absolute due times, so late wake-ups do not add up; unpaced, sleep(0)
            # still lets the other streams interleave.
            due += options.itl_s * len(batch)
            await asyncio.sleep(max(0.0, due - clock()))
            batch.clear()
    await _finish(conn, head, chat, usage)


async def _inject_fault(conn: _Connection, fault: str, index: int, chunks: int) -> bool:
    """Misbehaves before content chunk `index` as `fault` says; True when the response is over."""
    if fault == "truncate" and index == chunks // 2:
        await conn.write_chunk(b"")  # a clean end of the body, without data: [DONE]
        return True
    if fault == "disconnect" and index == chunks // 2:
        if conn.transport is not None:
            conn.transport.close()
        return True
    if fault in ("inband_error", "event_error") and index == 1:
        prefix = "event: error\n" if fault == "event_error" else ""
        await conn.write_chunk(
            f'{prefix}data: {{"error": {{"message": "stub fault: engine died", "code": 500}}}}\n\n'.encode()
        )
        await conn.write_chunk(b"")
        return True
    if fault == "bad_json" and index == 1:
        await conn.write_chunk(b"data: {not json\n\n")
    if fault == "keepalive":
        await conn.write_chunk(b": keep-alive\n\n")
    return False


async def _finish(conn: _Connection, head: str, chat: bool, usage: dict[str, int] | None) -> None:
    """The finish chunk, the usage-only chunk when asked for, [DONE], and the end of the body."""
    finish = '"delta": {}' if chat else '"text": ""'
    await conn.write_chunk(f'data: {head}{finish}, "finish_reason": "length"}}]}}\n\n'.encode())
    if usage is not None:
        envelope = head[: head.index(', "choices"')]
        await conn.write_chunk(
            f'data: {envelope}, "choices": [], "usage": {json.dumps(usage)}}}\n\n'.encode()
        )
    await conn.write_chunk(b"data: [DONE]\n\n")
    await conn.write_chunk(b"")


# Pending connections the listening socket queues: asyncio's default (100) drops the SYNs of a larger
# burst, whose clients then retry a second later.
LISTEN_BACKLOG = 4096


async def serve(host: str, port: int, options: StubOptions, stats: StubStats | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    seen = stats if stats is not None else StubStats()
    return await loop.create_server(
        lambda: _Connection(options, seen), host, port, reuse_address=True, backlog=LISTEN_BACKLOG
    )


class StubServerThread:
    """Runs the stub on its own event loop in a background thread (for tests)."""

    def __init__(self, options: StubOptions | None = None, host: str = "127.0.0.1") -> None:
        self.options = options or StubOptions()
        self.stats = StubStats()
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> StubServerThread:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(serve(self.host, 0, self.options, self.stats), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--no-tokenize", action="store_true", help="answer 404 to POST /tokenize")
    parser.add_argument(
        "--usage-per-chunk", action="store_true", help="cumulative usage in every content chunk"
    )
    parser.add_argument("--events-per-write", type=int, default=8, help="content events per network write")
    args = parser.parse_args()
    options = StubOptions(
        args.tokens_per_chunk,
        args.ttft_ms / 1000,
        args.itl_ms / 1000,
        not args.no_tokenize,
        args.usage_per_chunk,
        args.events_per_write,
    )

    async def forever() -> None:
        server = await serve(args.host, args.port, options)
        print(f"stub server on http://{args.host}:{args.port}/v1", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(forever())


if __name__ == "__main__":
    main()
