"""OpenAI's Agents SDK, unchanged, against a live server on a fake engine: an agent calls a function
tool, gets its result back and answers, through the Responses API (the SDK's default model) and
through chat completions, streamed and not, with a typed final output too."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from pydantic import BaseModel

from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is sunny in Paris."
WEATHER = "Sunny, 21 C in Paris"


class ScriptedEngine(FakeEngine):
    """Replies with the next of `replies` per request (the last one from then on)."""

    def __init__(self, replies: list[str], **options: Any) -> None:
        self._replies = list(replies)
        super().__init__(**options)

    @property  # type: ignore[override]
    def reply(self) -> str:
        return self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]

    @reply.setter
    def reply(self, value: str) -> None:
        pass  # FakeEngine's constructor sets one reply; the script holds them


class Report(BaseModel):
    city: str
    temperature_c: int


@pytest.fixture(autouse=True)
def no_tracing() -> None:
    set_tracing_disabled(True)


def serve(
    replies: list[str], settings: ServerSettings | None = None
) -> tuple[ScriptedEngine, BackgroundServer]:
    engine = ScriptedEngine(replies, max_model_len=4096)
    return engine, BackgroundServer(engine, settings or ServerSettings())


def prompts(engine: FakeEngine) -> list[str]:
    """The prompts the engine got, as text (the fake tokenizer's ids are bytes + 3)."""
    return [bytes(t - 3 for t in call.prompt_token_ids).decode() for call in engine.calls]


def run_agent(server: BackgroundServer, api: str, stream: bool, output_type: type | None = None) -> Any:
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return WEATHER

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        model: Any
        if api == "responses":
            model = OpenAIResponsesModel(model="fake-model", openai_client=client)
        else:
            model = OpenAIChatCompletionsModel(model="fake-model", openai_client=client)
        agent = Agent(
            name="weather",
            instructions="Answer with the tools.",
            tools=[get_weather],
            model=model,
            model_settings=ModelSettings(max_tokens=256),
            output_type=output_type,
        )
        if not stream:
            return (await Runner.run(agent, "Weather in Paris?", max_turns=3)).final_output
        streamed = Runner.run_streamed(agent, "Weather in Paris?", max_turns=3)
        async for _ in streamed.stream_events():
            pass
        return streamed.final_output

    final = asyncio.run(run())
    assert seen == ["Paris"]
    return final


@pytest.mark.parametrize("api", ["responses", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_calls_its_tool_and_answers(api: str, stream: bool) -> None:
    engine, server = serve([CALL, ANSWER])
    with server:
        assert run_agent(server, api, stream) == ANSWER
    first, second = prompts(engine)
    assert "Answer with the tools." in first and '"name": "get_weather"' in first
    assert WEATHER in second and WEATHER not in first


def test_an_agent_with_a_typed_output_gets_it_parsed() -> None:
    engine, server = serve([CALL, '{"city": "Paris", "temperature_c": 21}'])
    with server:
        assert run_agent(server, "responses", stream=False, output_type=Report) == Report(
            city="Paris", temperature_c=21
        )
    assert engine.calls[-1].params.structured_outputs is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_reasoning_model_s_agent_gets_its_thinking_back_as_items(stream: bool) -> None:
    """The SDK sends the reasoning items of a turn back with the next; they reach the template."""
    thinking = "<think>\nI should call get_weather.\n</think>\n\n"
    engine, server = serve(
        [thinking + CALL, "<think>\nDone.\n</think>\n\n" + ANSWER], ServerSettings(reasoning_parser="think")
    )
    with server:
        assert run_agent(server, "responses", stream) == ANSWER
    history = engine.tokenizer.last_chat["messages"]
    assert any(m.get("reasoning_content") == "I should call get_weather." for m in history)
