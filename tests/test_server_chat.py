"""POST /v1/chat/completions through the official openai client against a live server on a fake engine."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import httpx
import pytest

from batchlm.core.facts import ModelFacts
from batchlm.engine.client import ServedModel
from batchlm.server.background import BackgroundServer
from batchlm.server.responding import system_fingerprint
from fake_engine import FakeEngine, FakeTokenizer

REPLY = "Hello from the fake engine."
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(reply=REPLY, max_model_len=256, cached_tokens=3)


def prompt_len(messages: list[dict[str, str]]) -> int:
    return len(FakeTokenizer().apply_chat_template(messages))


def test_non_streaming_response_has_openai_shape_and_usage(client: Any, engine: FakeEngine) -> None:
    response = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=5)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == "fake-model"
    [choice] = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY[:5]
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert response.usage.prompt_tokens == prompt_len(USER)
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == prompt_len(USER) + 5
    assert response.usage.prompt_tokens_details.cached_tokens == 3
    assert engine.calls[-1].prompt_token_ids == FakeTokenizer().apply_chat_template(USER)


def test_eos_finishes_with_stop_and_default_budget_is_the_context_room(
    client: Any, engine: FakeEngine
) -> None:
    response = client.chat.completions.create(model="fake-model", messages=USER)
    assert response.choices[0].message.content == REPLY
    assert response.choices[0].finish_reason == "stop"
    assert engine.calls[-1].params.max_tokens == 256 - prompt_len(USER)


def test_streaming_sends_role_then_content_then_finish(client: Any) -> None:
    chunks = list(
        client.chat.completions.create(model="fake-model", messages=USER, max_tokens=6, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(chunk.usage is None for chunk in chunks)
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert "".join(content) == REPLY[:6]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length"
    assert last.delta.content is None and last.delta.role is None
    assert len({c.id for c in chunks}) == 1


def test_responses_and_chunks_carry_the_system_fingerprint(client: Any, engine: FakeEngine) -> None:
    fingerprint = system_fingerprint(engine.model_info)
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fingerprint)
    response = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2)
    options = {"include_usage": True}
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=USER, max_tokens=2, stream=True, stream_options=options
        )
    )
    assert {response.system_fingerprint, *(chunk.system_fingerprint for chunk in chunks)} == {fingerprint}


def test_the_system_fingerprint_follows_the_configuration_not_the_kv_cache_size() -> None:
    facts = ModelFacts(256, 100, num_blocks=10, dtype="float32")
    served = ServedModel("m", facts, engine_config="EngineConfig(seed=0)")
    assert system_fingerprint(served) == system_fingerprint(replace(served))
    assert system_fingerprint(replace(served, facts=replace(facts, num_blocks=99))) == system_fingerprint(
        served
    )
    others = [
        replace(served, engine_config="EngineConfig(seed=1)"),
        replace(served, facts=replace(facts, dtype="bfloat16")),
        replace(served, served_model_name="n"),
    ]
    assert system_fingerprint(served) not in {system_fingerprint(other) for other in others}


def test_stream_include_usage_adds_a_usage_chunk_with_no_choices(server: BackgroundServer) -> None:
    body = {"messages": USER, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" in event for event in events)
    assert all(event["usage"] is None for event in events[:-1])
    assert events[-1]["choices"] == []
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3


@pytest.mark.parametrize("include_obfuscation", [False, True])
def test_stream_options_take_openais_obfuscation_switch(client: Any, include_obfuscation: bool) -> None:
    # The openai client's typed stream options carry it; a server that pads nothing honours either value.
    options = {"include_usage": True, "include_obfuscation": include_obfuscation}
    chat = client.chat.completions.create(
        model="fake-model", messages=USER, max_tokens=3, stream=True, stream_options=options
    )
    completion = client.completions.create(
        model="fake-model", prompt="hi", max_tokens=3, stream=True, stream_options=options
    )
    for chunks in (list(chat), list(completion)):
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_stream_without_include_usage_has_no_usage_key(server: BackgroundServer) -> None:
    body = {"messages": USER, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert lines and all('"usage"' not in line for line in lines)


def test_n_choices_are_ordered_by_index(client: Any) -> None:
    response = client.chat.completions.create(model="fake-model", messages=USER, n=3, max_tokens=40)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [REPLY, f"1:{REPLY}", f"2:{REPLY}"]
    assert response.usage.completion_tokens == sum(len(c.message.content) for c in response.choices)


def test_n_choices_stream_by_index(client: Any) -> None:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    roles = []
    for chunk in client.chat.completions.create(model="fake-model", messages=USER, n=2, stream=True):
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.index)
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert roles == [0, 1]
    assert texts == {0: REPLY, 1: f"1:{REPLY}"}
    assert finishes == {0: "stop", 1: "stop"}


def test_stop_strings_reach_the_engine_and_cut_the_text(client: Any, engine: FakeEngine) -> None:
    response = client.chat.completions.create(model="fake-model", messages=USER, stop=["fake"])
    assert engine.calls[-1].params.stop == ["fake"]
    assert response.choices[0].message.content == "Hello from the "
    assert response.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="fake-model", messages=USER, stop="from", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "Hello "


def test_sampling_fields_map_onto_sampling_params(client: Any, engine: FakeEngine) -> None:
    client.chat.completions.create(
        model="fake-model",
        messages=USER,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"65": 2.5},
        max_completion_tokens=4,
        max_tokens=9,
        user="someone",
        # Hints with nothing to act on: accepted, and no sampling field moves.
        safety_identifier="someone",
        prompt_cache_key="conversation-1",
        prompt_cache_retention="24h",
        prompt_cache_options={"mode": "explicit", "ttl": "30m"},
        verbosity="low",
        extra_body={
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 2,
            "ignore_eos": True,
            "stop_token_ids": [7],
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        },
    )
    params = engine.calls[-1].params
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.logit_bias == {65: 2.5}
    assert params.max_tokens == 4  # max_completion_tokens wins over the deprecated max_tokens
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (5, 0.1, 1.2, 2)
    assert params.ignore_eos and params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.stop_token_ids == [7]
    assert params.logprobs is None


def test_logprobs_in_chat_format(client: Any) -> None:
    response = client.chat.completions.create(
        model="fake-model", messages=USER, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert [entry.token for entry in content] == list(REPLY[:3])
    assert [entry.bytes for entry in content] == [[ord(ch)] for ch in REPLY[:3]]
    assert content[0].logprob == pytest.approx(-0.25)
    assert [alt.token for alt in content[0].top_logprobs] == ["H", "I"]
    assert [alt.logprob for alt in content[0].top_logprobs] == [pytest.approx(-0.25), pytest.approx(-1.25)]


def test_logprobs_without_top_logprobs_gives_empty_alternatives(client: Any, engine: FakeEngine) -> None:
    response = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=2, logprobs=True)
    assert engine.calls[-1].params.logprobs == 0
    assert [entry.top_logprobs for entry in response.choices[0].logprobs.content] == [[], []]


def test_streamed_logprobs_follow_each_content_delta(client: Any) -> None:
    stream = client.chat.completions.create(
        model="fake-model", messages=USER, max_tokens=3, logprobs=True, top_logprobs=1, stream=True
    )
    entries = [c.choices[0].logprobs.content for c in stream if c.choices and c.choices[0].delta.content]
    assert [[e.token for e in entry] for entry in entries] == [["H"], ["e"], ["l"]]


def test_text_parts_system_and_developer_roles_reach_the_template(client: Any, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "one", "prompt_cache_breakpoint": {"mode": "explicit"}},
                {"type": "text", "text": "two"},
            ],
        },
        {"role": "assistant", "content": "ok", "name": "bot"},
        {"role": "user", "content": "again"},
    ]
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=1)
    rendered = engine.tokenizer.last_chat["messages"]
    assert rendered == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": "ok", "name": "bot"},
        {"role": "user", "content": "again"},
    ]


def test_an_assistant_s_refusal_parts_are_what_it_said(client: Any, engine: FakeEngine) -> None:
    # OpenAI's chat API takes them in assistant messages (a history an OpenAI model refused in), as the
    # Responses API here does.
    messages = [
        *USER,
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
        {"role": "user", "content": "again"},
    ]
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=1)
    assert engine.tokenizer.last_chat["messages"][1] == {
        "role": "assistant",
        "content": "I can't help with that.",
    }


def test_an_assistant_message_s_refusal_is_what_it_said(client: Any, engine: FakeEngine) -> None:
    # The message of a declined OpenAI completion, sent back as it came: no content, its refusal.
    declined = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    messages = [*USER, declined, {"role": "user", "content": "again"}]
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=1)
    assert engine.tokenizer.last_chat["messages"][1] == {
        "role": "assistant",
        "content": "I can't help with that.",
    }


def test_template_controls_are_passed_through(client: Any, engine: FakeEngine) -> None:
    messages = [*USER, {"role": "assistant", "content": "Sure, "}]
    client.chat.completions.create(
        model="fake-model",
        messages=messages,
        max_tokens=1,
        extra_body={
            "continue_final_message": True,
            "add_generation_prompt": False,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert engine.tokenizer.last_chat["kwargs"] == {"enable_thinking": False}
    expected = FakeTokenizer().apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert engine.calls[-1].prompt_token_ids == expected


def test_echo_starts_the_reply_with_the_continued_message(client: Any) -> None:
    # vLLM's chat `echo`: the assistant message the request continues comes back before the new text.
    messages = [*USER, {"role": "assistant", "content": "Sure, "}]
    body = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
    reply = client.chat.completions.create(
        model="fake-model", messages=messages, max_tokens=5, extra_body=body
    )
    assert reply.choices[0].message.content == "Sure, " + REPLY[:5]
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, max_tokens=5, stream=True, extra_body=body
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "Sure, " + REPLY[:5]
    # A last message that is not the assistant's is not echoed.
    reply = client.chat.completions.create(
        model="fake-model", messages=USER, max_tokens=5, extra_body={"echo": True}
    )
    assert reply.choices[0].message.content == REPLY[:5]


@pytest.mark.parametrize("name", ["default", "default_model", "/models/fake"])
def test_placeholder_names_and_aliases_are_accepted(client: Any, name: str) -> None:
    response = client.chat.completions.create(model=name, messages=USER, max_tokens=1)
    assert response.model == "fake-model"


TEXTS = ["Hi", 'quote " and \\ slash', "line\nbreak\ttab\x01", "é ü 中文 \u2028 😀", "</s>"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_text_delta_is_the_pydantic_chunk_byte_for_byte(include_usage: bool) -> None:
    from batchlm.outputs import CompletionOutput, RequestOutput
    from batchlm.reasoning.message import MessageReader
    from batchlm.reasoning.split import ReasoningParser, ThinkMarkers
    from batchlm.server.responses import ChatChunkChoice
    from batchlm.server.serving_chat import ChatContext, ChatFormatter

    def formatter(reader: MessageReader | None) -> ChatFormatter:
        context = ChatContext(
            request_id="chatcmpl-1", created=7, model='a "quoted" model', tokenizer=FakeTokenizer(), n=2,
            include_usage=include_usage, top_logprobs=None, reader=reader,
        )  # fmt: skip
        return ChatFormatter(context)

    def output(index: int, text: str) -> RequestOutput:
        return RequestOutput("r", None, [], [CompletionOutput(index=index, text=text, token_ids=[5])], False)

    plain = formatter(None)
    for index in (0, 1):
        for text in TEXTS:
            expected = plain._chunk([ChatChunkChoice(index=index, delta={"content": text})])
            assert list(plain.delta(0, output(index, text))) == [expected]
    # A reasoning model's stream: its thinking, then its answer, each a delta of its own key.
    thinking = formatter(MessageReader(ReasoningParser(ThinkMarkers("<think>", "</think>")), None))
    for index in (0, 1):
        assert list(thinking.delta(0, output(index, "<think>"))) == []
        for text in TEXTS:
            expected = thinking._chunk([ChatChunkChoice(index=index, delta={"reasoning_content": text})])
            assert list(thinking.delta(0, output(index, text))) == [expected]
        answer = thinking._chunk([ChatChunkChoice(index=index, delta={"content": "Yes."})])
        assert list(thinking.delta(0, output(index, "</think>Yes."))) == [answer]


def test_stop_reason_names_the_stop_string_as_vllm_does(client: Any) -> None:
    """vLLM's `stop_reason`: the stop string that ended a choice, on its finish chunk when streamed."""
    [choice] = client.chat.completions.create(model="fake-model", messages=USER, stop=["fake"]).choices
    assert (choice.message.content, choice.finish_reason, choice.stop_reason) == (
        "Hello from the ",
        "stop",
        "fake",
    )
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, stop="fake", stream=True))
    assert [c.choices[0].stop_reason for c in chunks] == [None] * (len(chunks) - 1) + ["fake"]
    [plain] = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=3).choices
    assert (plain.finish_reason, plain.stop_reason) == ("length", None)
