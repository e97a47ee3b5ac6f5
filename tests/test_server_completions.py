"""POST /v1/completions: prompt forms, batches, echo, logprobs format and streaming, against a fake engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from batchlm.server.background import BackgroundServer
from batchlm.server.responding import system_fingerprint
from fake_engine import FakeEngine, FakeTokenizer

REPLY = "Hello from the fake engine."
TOKENIZER = FakeTokenizer()


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(reply=REPLY, max_model_len=128)


def test_text_prompt(client: Any, engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt="Say", max_tokens=5)
    assert response.id.startswith("cmpl-")
    assert response.object == "text_completion"
    [choice] = response.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, REPLY[:5], "length")
    assert engine.calls[-1].prompt_token_ids == TOKENIZER.encode("Say")
    assert engine.calls[-1].prompt == "Say"
    assert response.usage.prompt_tokens == len(TOKENIZER.encode("Say"))
    assert response.usage.completion_tokens == 5


def test_default_max_tokens_fills_the_context(client: Any, engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt="Say")
    assert engine.calls[-1].params.max_tokens == 128 - len(TOKENIZER.encode("Say"))
    assert response.choices[0].text == REPLY
    assert response.choices[0].finish_reason == "stop"


def test_add_special_tokens_false_leaves_out_bos(client: Any, engine: FakeEngine) -> None:
    client.completions.create(
        model="fake-model", prompt="Say", max_tokens=1, extra_body={"add_special_tokens": False}
    )
    assert engine.calls[-1].prompt_token_ids == TOKENIZER.encode("Say", add_special_tokens=False)


def test_token_id_prompt_is_one_prompt(client: Any, engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt=[70, 71, 72], max_tokens=2)
    assert len(response.choices) == 1
    assert engine.calls[-1].prompt_token_ids == [70, 71, 72]
    assert engine.calls[-1].prompt is None


def test_batch_of_prompts_orders_choices_prompt_by_prompt(client: Any, engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt=["a", "bb", "ccc"], n=2, max_tokens=4)
    assert [c.index for c in response.choices] == list(range(6))
    assert [c.text for c in response.choices] == [REPLY[:4], f"1:{REPLY}"[:4]] * 3
    prompts = [call.prompt for call in engine.calls[-3:]]
    assert sorted(prompts) == ["a", "bb", "ccc"]  # type: ignore[type-var]
    assert response.usage.prompt_tokens == sum(len(TOKENIZER.encode(p)) for p in ["a", "bb", "ccc"])
    assert response.usage.completion_tokens == 6 * 4


def test_batch_of_token_lists(client: Any, engine: FakeEngine) -> None:
    response = client.completions.create(model="fake-model", prompt=[[70, 71], [72]], max_tokens=1)
    assert [c.index for c in response.choices] == [0, 1]
    assert sorted(call.prompt_token_ids for call in engine.calls[-2:]) == [[70, 71], [72]]


def test_echo_prepends_the_prompt(client: Any) -> None:
    response = client.completions.create(model="fake-model", prompt="Say: ", max_tokens=5, echo=True)
    assert response.choices[0].text == "Say: " + REPLY[:5]
    by_ids = client.completions.create(model="fake-model", prompt=[1, 86, 100], max_tokens=1, echo=True)
    assert by_ids.choices[0].text == "<s>Sa" + REPLY[:1]


def test_echo_with_no_tokens_to_generate_is_the_echo_alone(client: Any) -> None:
    # The legacy way to score (or just render) a prompt: nothing completed, nothing counted.
    response = client.completions.create(model="fake-model", prompt="Say: ", max_tokens=0, echo=True, n=2)
    assert [(c.text, c.finish_reason) for c in response.choices] == [("Say: ", "length")] * 2
    assert response.usage.completion_tokens == 0
    assert response.usage.total_tokens == response.usage.prompt_tokens
    stream = client.completions.create(
        model="fake-model",
        prompt="Say: ",
        max_tokens=0,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Say: "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError):  # without echo there is nothing to answer
        client.completions.create(model="fake-model", prompt="Say: ", max_tokens=0)


def test_logprobs_in_completions_format(client: Any) -> None:
    response = client.completions.create(model="fake-model", prompt="Say", max_tokens=4, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == list(REPLY[:4])
    assert logprobs.token_logprobs == pytest.approx([-0.25, -0.26, -0.27, -0.28])
    assert logprobs.top_logprobs[0] == pytest.approx({"H": -0.25, "I": -1.25})
    assert logprobs.text_offset == [0, 1, 2, 3]


def test_streaming_text_chunks_end_with_finish_reason(client: Any) -> None:
    chunks = list(client.completions.create(model="fake-model", prompt="Say", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == REPLY[:5]
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert all(c.object == "text_completion" for c in chunks)


def test_completions_and_their_chunks_carry_the_system_fingerprint(client: Any, engine: FakeEngine) -> None:
    fingerprint = system_fingerprint(engine.model_info)
    response = client.completions.create(model="fake-model", prompt="Say", max_tokens=2)
    chunks = list(client.completions.create(model="fake-model", prompt="Say", max_tokens=2, stream=True))
    assert {response.system_fingerprint, *(chunk.system_fingerprint for chunk in chunks)} == {fingerprint}


def test_streaming_logprobs_keep_counting_offsets(client: Any) -> None:
    stream = client.completions.create(
        model="fake-model", prompt="Say", max_tokens=3, logprobs=0, stream=True
    )
    offsets = [c.choices[0].logprobs.text_offset for c in stream]
    assert offsets == [[0], [1], [2]]


def test_streaming_batch_with_echo_and_usage(server: BackgroundServer) -> None:
    body = {
        "prompt": ["x", "y"],
        "max_tokens": 2,
        "echo": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "x" + REPLY[:2], 1: "y" + REPLY[:2]}
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client: Any, engine: FakeEngine) -> None:
    # 300 characters cannot fit a 128-token context; their last 10 tokens can.
    long_text = "abc" * 100
    response = client.completions.create(
        model="fake-model", prompt=long_text, max_tokens=2, extra_body={"truncate_prompt_tokens": 10}
    )
    assert engine.calls[-1].prompt_token_ids == TOKENIZER.encode(long_text)[-10:]
    assert engine.calls[-1].prompt is None  # the text no longer describes the prompt
    assert response.usage.prompt_tokens == 10
    chat = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": long_text}],
        max_tokens=2,
        extra_body={"truncate_prompt_tokens": 4},
    )
    assert chat.usage.prompt_tokens == 4


@pytest.mark.parametrize("keep", [0, -2])
def test_truncate_prompt_tokens_must_be_positive_or_minus_one(server: BackgroundServer, keep: int) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": keep}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "truncate_prompt_tokens"


def test_truncate_prompt_tokens_minus_one_is_the_context_length(server: BackgroundServer) -> None:
    # vLLM clients send -1 for "truncate to the model's context": a prompt that fits is served whole.
    body = {"prompt": "hi", "max_tokens": 2, "truncate_prompt_tokens": -1}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(TOKENIZER.encode("hi"))


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_text_chunk_is_the_pydantic_chunk_byte_for_byte(include_usage: bool) -> None:
    from batchlm.outputs import CompletionOutput, FinishReason, RequestOutput
    from batchlm.server.responses import CompletionChoice
    from batchlm.server.serving_completions import CompletionContext, CompletionFormatter

    context = CompletionContext(
        request_id="cmpl-1", created=7, model='a "quoted" model', tokenizer=TOKENIZER, n=2,
        include_usage=include_usage, logprobs=None, echo_texts=["", ""],
    )  # fmt: skip
    formatter = CompletionFormatter(context)
    texts = ["Hi", "", 'quote " and \\ slash', "line\nbreak\ttab\x01", "é ü 中文 \u2028 😀", "</s>"]
    reasons = [None, FinishReason.STOP, FinishReason.LENGTH]
    for position in (0, 1):
        for index in (0, 1):
            for text in texts:
                for reason in reasons:
                    completion = CompletionOutput(index=index, text=text, token_ids=[5], finish_reason=reason)
                    output = RequestOutput("r", None, [], [completion], finished=reason is not None)
                    fast = list(formatter.delta(position, output))
                    if not text and reason is None:
                        assert fast == []
                        continue
                    choice = CompletionChoice(
                        index=position * 2 + index,
                        text=text,
                        finish_reason=None if reason is None else reason.value,
                    )
                    assert fast == [formatter._chunk([choice])]


@pytest.mark.parametrize("logprobs", [None, 1])
def test_stop_reason_names_the_stop_string_as_vllm_does(client: Any, logprobs: int | None) -> None:
    """vLLM's `stop_reason`: the stop string that ended a choice, on its last chunk when streamed."""
    body = {"model": "fake-model", "prompt": "Say", "stop": ["fake"], "logprobs": logprobs}
    [choice] = client.completions.create(**body).choices
    assert (choice.text, choice.finish_reason, choice.stop_reason) == ("Hello from the ", "stop", "fake")
    chunks = list(client.completions.create(stream=True, **body))
    assert [c.choices[0].stop_reason for c in chunks] == [None] * (len(chunks) - 1) + ["fake"]
    [plain] = client.completions.create(model="fake-model", prompt="Say", max_tokens=3).choices
    assert (plain.finish_reason, plain.stop_reason) == ("length", None)
