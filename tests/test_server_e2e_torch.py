"""End to end: the official openai client against `batchlm serve`'s app with the PyTorch engine core in
its own process, on the tiny random-weight llama."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from batchlm import LLM, SamplingParams
from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import metric_value, openai_client, wait_until
from live_server import serving

API_KEY = "test-key"
PROMPTS = [f"Story number {i}: once upon a time" for i in range(32)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[BackgroundServer]:
    config = EngineConfig(model=str(model_dir), device="cpu", max_num_seqs=32, served_model_name="tiny")
    with serving(AsyncLLMEngine(config, multiprocess=True), ServerSettings(api_key=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Any:
    return openai_client(server.base_url, api_key=API_KEY)


@pytest.fixture(scope="module")
def offline_greedy(model_dir: Path) -> list[str]:
    """What the offline engine produces for PROMPTS, greedy, 8 tokens each."""
    llm = LLM(model=str(model_dir), device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(PROMPTS, params)]


def test_echo_with_logprobs_scores_the_prompt(client: Any, model_dir: Path) -> None:
    prompt = PROMPTS[3]
    llm = LLM(model=str(model_dir), device="cpu")
    [offline] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    assert offline.prompt_logprobs is not None
    expected = [None] + [entry.logprob for entry in offline.prompt_logprobs[1:] if entry is not None]
    size = len(offline.prompt_token_ids)
    # lm-evaluation-harness scores a continuation so: echo, logprobs, one token.
    reply = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0.0, echo=True, logprobs=2
    )
    [choice] = reply.choices
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt) and len(logprobs.tokens) == size + 1
    assert logprobs.token_logprobs[:size] == pytest.approx(expected, abs=1e-4)
    assert logprobs.top_logprobs[0] is None and all(len(top) in (2, 3) for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[size] == len(prompt)
    stream = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0.0, echo=True, logprobs=2, stream=True
    )
    first, *rest = list(stream)
    assert first.choices[0].text == prompt
    assert first.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert "".join(chunk.choices[0].text for chunk in rest) == choice.text[len(prompt) :]
    # Older clients score with max_tokens 0: the same logprobs, the echo alone.
    scored = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=0, temperature=0.0, echo=True, logprobs=2
    )
    [only] = scored.choices
    assert only.text == prompt and len(only.logprobs.tokens) == size
    assert only.logprobs.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert scored.usage.completion_tokens == 0


def _vllm_prompt_logprobs(entries: Any, prompt_ids: list[int], top: int) -> list[dict[str, Any] | None]:
    """What vLLM's `prompt_logprobs` holds for the offline API's entries: per token after the first,
    by token id, the token itself with its rank, then its `top` most likely alternatives."""
    shaped: list[dict[str, Any] | None] = [None]
    for token_id, entry in zip(prompt_ids[1:], entries[1:], strict=True):
        position = {str(token_id): (entry.logprob, entry.rank)}
        for rank, (alt, logprob) in enumerate(entry.top[:top], start=1):
            position.setdefault(str(alt), (logprob, rank))
        shaped.append(position)
    return shaped


def _scores(answer: list[dict[str, dict[str, Any]] | None]) -> list[dict[str, Any] | None]:
    return [
        None if position is None else {k: (v["logprob"], v["rank"]) for k, v in position.items()}
        for position in answer
    ]


def _assert_close(got: list[dict[str, Any] | None], expected: list[dict[str, Any] | None]) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for answer, offline in zip(got[1:], expected[1:], strict=True):
        assert answer is not None and offline is not None
        assert list(answer) == list(offline)  # the same tokens, the prompt's own first
        for key, (logprob, rank) in offline.items():
            assert answer[key][0] == pytest.approx(logprob, abs=1e-4) and answer[key][1] == rank


def test_prompt_logprobs_are_the_offline_apis_in_vllms_shape(
    server: BackgroundServer, model_dir: Path
) -> None:
    """vLLM's `prompt_logprobs` field: per completions choice (every choice of the prompt), at the top of
    a chat response; the values the offline API gives for the same prompt."""
    top = 3
    prompt = PROMPTS[5]
    messages = [{"role": "user", "content": "Tell me a story."}]
    llm = LLM(model=str(model_dir), device="cpu")
    ask = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=top)
    [text] = llm.generate([prompt], ask)
    [chat] = llm.chat(messages, ask)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as http:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "n": 2}
        completion = http.post("/v1/completions", json={**body, "prompt_logprobs": top}).json()
        # With echo and logprobs, each field gets as many alternatives as it asked for.
        echoed = http.post(
            "/v1/completions", json={**body, "prompt_logprobs": top, "echo": True, "logprobs": 1}
        ).json()
        replied = http.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": messages, "max_tokens": 1, "prompt_logprobs": top},
        ).json()
        plain = http.post("/v1/completions", json=body).json()
    expected = _vllm_prompt_logprobs(text.prompt_logprobs, text.prompt_token_ids, top)
    for choice in completion["choices"] + echoed["choices"]:
        _assert_close(_scores(choice["prompt_logprobs"]), expected)
    assert all(len(top_entry) <= 2 for top_entry in echoed["choices"][0]["logprobs"]["top_logprobs"][1:])
    decoded = [
        entry[str(t)]["decoded_token"]
        for t, entry in zip(
            text.prompt_token_ids[1:], completion["choices"][0]["prompt_logprobs"][1:], strict=True
        )
    ]
    assert "".join(decoded) == prompt  # after the BOS, the prompt's text token by token
    _assert_close(
        _scores(replied["prompt_logprobs"]),
        _vllm_prompt_logprobs(chat.prompt_logprobs, chat.prompt_token_ids, top),
    )
    assert "prompt_logprobs" not in replied["choices"][0]
    assert all("prompt_logprobs" not in choice for choice in plain["choices"])  # not asked: absent


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"prompt_logprobs": -1}, "prompt_logprobs must be in [0, 20]"),
        ({"prompt_logprobs": 21}, "prompt_logprobs must be in [0, 20]"),
        ({"prompt_logprobs": 1, "stream": True}, "not available when 'stream' is true"),
    ],
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_out_of_bounds_are_400s(
    server: BackgroundServer, route: str, extra: dict[str, Any], message: str
) -> None:
    body = {"model": "tiny", "max_tokens": 1, **extra}
    body |= (
        {"prompt": "Hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    response = httpx.post(
        f"{server.base_url}{route}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_logprobs" and message in error["message"]


def test_echoed_text_offsets_point_into_the_echoed_text(client: Any, model_dir: Path) -> None:
    """The tokenizer puts a BOS before a text prompt; the echo is the text as sent, without it: the
    BOS takes no place, and every token stands in the choice's text where its offset says."""
    prompt = PROMPTS[5]
    reply = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0.0, echo=True, logprobs=1
    )
    [choice] = reply.choices
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert choice.text.startswith(prompt) and tokens[0] == "<|begin_of_text|>"
    assert offsets[:2] == [0, 0] and offsets == sorted(offsets)
    for token, offset in zip(tokens[1:], offsets[1:], strict=True):
        if "\\x" not in token:  # a token of whole characters
            assert choice.text[offset : offset + len(token)] == token
    # A prompt of token ids is echoed as they decode, the BOS's text included.
    by_ids = client.completions.create(
        model="tiny", prompt=[0, 1093, 321], max_tokens=1, temperature=0.0, echo=True, logprobs=1
    )
    [echoed] = by_ids.choices
    assert echoed.text.startswith("<|begin_of_text|>Hello")
    assert echoed.logprobs.text_offset[:3] == [0, len("<|begin_of_text|>"), len("<|begin_of_text|>Hel")]


def test_top_logprobs_list_the_chosen_token_too(client: Any) -> None:
    """As OpenAI's legacy format: up to logprobs + 1 entries, the chosen token's among them, so a client
    reads each token's logprob from its entry (the random-weight model rarely ranks the prompt's first)."""
    reply = client.completions.create(
        model="tiny", prompt=PROMPTS[7], max_tokens=6, temperature=1.0, seed=3, echo=True, logprobs=1
    )
    logprobs = reply.choices[0].logprobs
    entries = list(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True))[1:]
    for token, logprob, top in entries:
        assert top[token] == logprob and len(top) in (1, 2)
        assert (len(top) == 1) == (logprob == max(top.values()))
    assert any(len(top) == 2 for _, _, top in entries)


def test_logprobs_are_the_raw_distribution_on_both_endpoints(client: Any) -> None:
    """As vLLM's default logprobs mode (and the README): a token that logit_bias forces keeps its unbiased
    logprob, and the alternatives are those of the plain request, on completions and chat alike."""

    def completion(**extra: Any) -> tuple[float, dict[str, float]]:
        reply = client.completions.create(
            model="tiny", prompt=PROMPTS[9], max_tokens=1, temperature=0.0, logprobs=2, **extra
        )
        logprobs = reply.choices[0].logprobs
        return logprobs.token_logprobs[0], logprobs.top_logprobs[0]

    def chat(**extra: Any) -> tuple[float, dict[str, float]]:
        messages = [{"role": "user", "content": PROMPTS[9]}]
        reply = client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=2,
            **extra,
        )
        entry = reply.choices[0].logprobs.content[0]
        return entry.logprob, {alt.token: alt.logprob for alt in entry.top_logprobs}

    for first_token in (completion, chat):
        _, top = first_token()
        forced, biased_top = first_token(logit_bias={"5": 100})
        assert forced < max(top.values())  # unbiased: with the bias of 100 it would be about 0
        for token, logprob in top.items():
            assert biased_top[token] == pytest.approx(logprob, abs=1e-4)


def test_api_key_is_enforced(server: BackgroundServer) -> None:
    bad = openai_client(server.base_url, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_32_concurrent_streams_each_correct(server: BackgroundServer, offline_greedy: list[str]) -> None:
    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, Any]:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return text, usage

    async def all_streams() -> list[tuple[str, Any]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    results = asyncio.run(all_streams())
    assert [text for text, _ in results] == offline_greedy
    assert all(usage is not None and usage.completion_tokens == 8 for _, usage in results)


def test_32_concurrent_unstreamed_requests_each_correct_and_timed(
    server: BackgroundServer, offline_greedy: list[str]
) -> None:
    """A response that is not streamed gets its tokens from the core all at once, when it finishes:
    the same texts, and the metrics still count one inter-token gap per token after the first."""

    async def one(client: openai.AsyncOpenAI, prompt: str) -> str:
        response = await client.completions.create(
            model="tiny", prompt=prompt, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True}
        )
        assert response.usage is not None and response.usage.completion_tokens == 8
        return response.choices[0].text

    async def all_requests() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    def gaps_counted() -> float:
        text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        return metric_value(text, "batchlm_inter_token_latency_seconds_count") or 0.0

    before = gaps_counted()
    assert asyncio.run(all_requests()) == offline_greedy
    assert gaps_counted() - before == len(PROMPTS) * 7


def test_exact_max_tokens_n_and_logprobs(client: Any) -> None:
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    for choice in response.choices:
        assert choice.finish_reason == "length"
        entries = choice.logprobs.content
        assert len(entries) == 6
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    again = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_disconnect_mid_stream_frees_the_request(server: BackgroundServer) -> None:
    url = f"{server.base_url}/v1/completions"
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                break  # one token arrived; now hang up

    def idle() -> bool:
        metrics = httpx.get(f"{server.base_url}/metrics").text
        return metric_value(metrics, "batchlm_num_requests_running") == 0

    wait_until(idle, 30, "the engine to drop the aborted request")
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert (metric_value(metrics, "batchlm_kv_cache_usage_ratio") or 0.0) == 0.0


def test_engine_death_fails_health_and_in_flight(server: BackgroundServer, client: Any) -> None:
    """Runs last in this module: it kills the engine core process."""
    engine = server.engine
    assert isinstance(engine, AsyncLLMEngine)
    worker = engine._worker
    assert worker is not None and hasattr(worker, "pid")
    os.kill(worker.pid, signal.SIGKILL)  # type: ignore[union-attr,arg-type]
    wait_until(lambda: engine.is_dead, 30, "the engine to be seen dead")
    assert httpx.get(f"{server.base_url}/health").status_code == 503
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert info.value.status_code == 503
