"""What the tool-calling tests share: the tools a request offers, a model's call markup, and how a test
reads the prompt the fake engine got or posts a raw chat request."""

from __future__ import annotations

from typing import Any

import httpx

from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
TIME_PARAMETERS = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER_PARAMETERS},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMETERS}},
]
PARIS = '{"city": "Paris", "unit": "celsius"}'
HERMES_REPLY = f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>'
MARKUP = ("<tool_call>", "</tool_call>", '"name"')


def prompt_of(engine: FakeEngine) -> str:
    """The last prompt the engine got, as text (the fake tokenizer's ids are bytes + 3)."""
    return bytes(t - 3 for t in engine.calls[-1].prompt_token_ids).decode()


def post(server: BackgroundServer, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": USER, **body}, timeout=30)


def reply_of(client: Any, stream: bool, **request: Any) -> tuple[str, list[tuple[str, str]], str]:
    """The content, calls (name, arguments) and finish_reason of a one-choice chat reply, streamed or
    not, through the openai client."""
    body = {"model": "fake-model", "messages": USER, "tools": TOOLS, **request}
    if not stream:
        [choice] = client.chat.completions.create(**body).choices
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        return choice.message.content or "", calls, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(**body, stream=True) if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed: list[tuple[str, str]] = []
    for piece in (p for c in chunks for p in c.choices[0].delta.tool_calls or ()):
        if piece.id is not None:
            streamed.append((piece.function.name, ""))
        name, arguments = streamed[piece.index]
        streamed[piece.index] = (name, arguments + (piece.function.arguments or ""))
    return content, streamed, chunks[-1].choices[0].finish_reason
