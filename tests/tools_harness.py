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
