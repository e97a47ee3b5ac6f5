"""The Responses stream of every tool-call parser's outputs, cut at every split point: its events are
well formed and in order, and the response they end with holds the calls and text the parser reads out
of the whole output (the chat stream's own checks are in test_tool_parser_streams)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from batchlm.outputs import CompletionOutput, FinishReason, RequestOutput
from batchlm.reasoning.message import MessageReader
from batchlm.reasoning.registry import THINK
from batchlm.reasoning.split import ReasoningParser
from batchlm.sampling_params import SamplingParams
from batchlm.server.protocol_responses import ResponsesRequest
from batchlm.server.responses import UsageInfo
from batchlm.server.serving_chat import ChatContext
from batchlm.server.serving_responses import ResponsesFormatter
from batchlm.tools.hermes import HermesParser
from batchlm.tools.parser import ToolParser
from fake_engine import FakeTokenizer
from responses_harness import check_order
from tool_parser_cases import CASES, IDS


def events_of(
    parser: ToolParser | None, chunks: list[str], reasoning: ReasoningParser | None = None
) -> list[dict[str, Any]]:
    context = ChatContext(
        request_id="resp_test",
        created=0,
        model="m",
        tokenizer=FakeTokenizer(),
        n=1,
        include_usage=True,
        top_logprobs=None,
        reader=MessageReader(reasoning, parser),
    )
    formatter = ResponsesFormatter(context, ResponsesRequest(input="hi"), SamplingParams())
    raw = list(formatter.opening())
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        completion = CompletionOutput(0, chunk, [1], finish_reason=FinishReason.STOP if last else None)
        raw += formatter.delta(0, RequestOutput("r", None, [], [completion], finished=last))
    raw += formatter.closing(
        UsageInfo(prompt_tokens=1, completion_tokens=len(chunks), total_tokens=1 + len(chunks))
    )
    events = []
    for block in b"".join(raw).decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        assert data == "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        events.append(payload)
    return events


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES, ids=IDS)
def test_every_split_ends_with_the_parsers_calls_and_text(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    for split in range(len(output) + 1):
        events = events_of(parser, [output[:split], output[split:]])
        check_order(events)
        final = events[-1]["response"]
        assert events[-1]["type"] == "response.completed" and final["status"] == "completed"
        items = final["output"]
        assert [(i["name"], i["arguments"]) for i in items if i["type"] == "function_call"] == calls
        text = "".join(i["content"][0]["text"] for i in items if i["type"] == "message")
        assert text == (content or "")
        streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert streamed == text
        for item in items:
            if item["type"] == "function_call":
                done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
                assert item["arguments"] in [e["arguments"] for e in done]


@pytest.mark.parametrize(("parser", "output", "content", "calls"), CASES, ids=IDS)
def test_one_character_at_a_time_leaks_no_markup(
    parser: ToolParser, output: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    events = events_of(parser, list(output) or [""])
    check_order(events)
    items = events[-1]["response"]["output"]
    assert [(i["name"], i["arguments"]) for i in items if i["type"] == "function_call"] == calls
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == (content or "")


def test_thinking_then_text_then_a_call_at_every_split() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    output = f"<think>\nPlan: call it.\n</think>\n\nLet me look.<tool_call>{call}</tool_call>"
    for split in range(len(output) + 1):
        events = events_of(HermesParser(), [output[:split], output[split:]], ReasoningParser(THINK, False))
        check_order(events)
        items = events[-1]["response"]["output"]
        assert [item["type"] for item in items] == ["reasoning", "message", "function_call"]
        assert items[0]["content"][0]["text"] == "Plan: call it."
        assert items[1]["content"][0]["text"] == "Let me look."
        assert json.loads(items[2]["arguments"]) == {"city": "Paris"}


def test_a_response_read_from_one_delta_holds_the_items_its_stream_would() -> None:
    """A non-streamed request's output comes from the engine at once (final_output_only): text the model
    wrote after a call still follows it, in a message of its own, as in the stream of it."""
    from batchlm.server.responding import ChoiceResult

    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    output = f"<think>\nPlan.\n</think>\n\nLet me look.\n{call}\nThen the time: {call}\nDone."
    streamed = events_of(HermesParser(), list(output), ReasoningParser(THINK, False))[-1]["response"][
        "output"
    ]
    context = ChatContext(
        request_id="resp_test", created=0, model="m", tokenizer=FakeTokenizer(), n=1, include_usage=True,
        top_logprobs=None, reader=MessageReader(ReasoningParser(THINK, False), HermesParser()),
    )  # fmt: skip
    formatter = ResponsesFormatter(context, ResponsesRequest(input="hi"), SamplingParams())
    result = ChoiceResult([output], [1], finish_reason=FinishReason.STOP)
    whole = [item.model_dump() for item in formatter.choices({(0, 0): result})]

    def layout(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(i["type"], i.get("name") or i["content"][0]["text"]) for i in items]

    assert (
        layout(whole)
        == layout(streamed)
        == [
            ("reasoning", "Plan."),
            ("message", "Let me look."),
            ("function_call", "get_weather"),
            ("message", "\nThen the time:"),
            ("function_call", "get_weather"),
            ("message", " Done."),
        ]
    )
