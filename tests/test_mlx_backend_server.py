"""End to end with the official openai client: the same server tests against both backends (the PyTorch
engine and MLXEngine) on the tiny random-weight llama, plus the two backends agreeing on greedy text."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import batchlm.backends as backends
from batchlm.config import EngineConfig
from batchlm.engine.client import EngineClient
from batchlm.server.background import BackgroundServer
from fake_engine import metric_value, wait_until
from live_server import serving

BACKENDS = [
    "torch",
    pytest.param("mlx", marks=pytest.mark.skipif(not backends.mlx_available(), reason="no mlx")),
]
USER = [{"role": "user", "content": "Write a short poem about the sea."}]
LONG_USER = [
    {"role": "user", "content": "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 6}
]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def make_engine(backend: str, model_dir: Path) -> EngineClient:
    config = EngineConfig(model=str(model_dir), max_num_seqs=8, served_model_name="tiny")
    if backend == "mlx":
        return backends.create_engine("mlx", config)
    from batchlm.engine.async_engine import AsyncLLMEngine

    # In-process core: the test needs no second Python process per module.
    return AsyncLLMEngine(config, multiprocess=False)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request: pytest.FixtureRequest, tiny_model_dir: Callable[..., Path]) -> Iterator[BackgroundServer]:
    engine = make_engine(request.param, tiny_model_dir("llama"))
    with serving(engine, ready_s=120) as running:
        yield running
    assert engine.is_dead


def stats_of(server: BackgroundServer) -> str:
    return httpx.get(f"{server.base_url}/metrics").text


def test_chat_completion_has_openai_shape_and_usage(client: Any) -> None:
    response = client.chat.completions.create(model="tiny", messages=USER, max_tokens=7, **GREEDY)
    [choice] = response.choices
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


@pytest.fixture(scope="module")
def reference_greedy(tiny_model_dir: Callable[..., Path]) -> Callable[[list[int], int], list[int]]:
    """Argmax tokens from transformers, recomputing the whole sequence each step."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)

    def greedy(prompt: list[int], num_tokens: int) -> list[int]:
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(num_tokens):
                sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
        return sequence[len(prompt) :]

    return greedy


def test_greedy_text_matches_transformers(
    client: Any, server: BackgroundServer, reference_greedy: Callable[[list[int], int], list[int]]
) -> None:
    prompt = server.engine.tokenizer.encode("Once upon a time there was")
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY)
    expected = server.engine.tokenizer.decode(reference_greedy(prompt, 12))
    assert response.choices[0].text == expected
    assert response.usage.prompt_tokens == len(prompt)


def test_streaming_matches_the_non_streaming_text(client: Any) -> None:
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=10, stream=True, **GREEDY)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_responses_api_gives_the_chat_text_streamed_and_not(client: Any) -> None:
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, **GREEDY)
    whole = client.responses.create(model="tiny", input=USER[0]["content"], max_output_tokens=6, **GREEDY)
    assert whole.output_text == chat.choices[0].message.content
    assert (whole.status, whole.usage.output_tokens) == ("incomplete", 6)
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    with client.responses.stream(
        model="tiny", input=USER[0]["content"], max_output_tokens=6, **GREEDY
    ) as stream:
        events = list(stream)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].type == "response.incomplete"


def test_echo_with_logprobs_scores_the_prompt_as_transformers(
    client: Any, tiny_model_dir: Callable[..., Path]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prompt = [0, 15, 92, 7, 41, 33, 120, 8]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    with torch.no_grad():
        raw = torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1)
    expected = [None] + [float(raw[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=1, **GREEDY
    )
    logprobs = response.choices[0].logprobs
    assert logprobs.token_logprobs[: len(prompt)] == pytest.approx(expected, abs=1e-3)
    assert len(logprobs.tokens) == len(prompt) + 1


def test_tokenizer_info_lets_a_client_tokenize_as_the_server(server: BackgroundServer) -> None:
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert info["model_max_length"] > 0 and info["chat_template"] and info["eos_token"]
    # What lm-evaluation-harness's remote tokenizer does with it: the EOS text encodes to one token.
    tokens = httpx.post(
        f"{server.base_url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}
    ).json()["tokens"]
    assert len(tokens) == 1


def test_repeated_prompt_reports_cached_tokens(client: Any) -> None:
    first = client.chat.completions.create(model="tiny", messages=LONG_USER, max_tokens=3, **GREEDY)
    second = client.chat.completions.create(model="tiny", messages=LONG_USER, max_tokens=3, **GREEDY)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 40
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert second.choices[0].message.content == first.choices[0].message.content


def test_completions_endpoint_honours_stop_strings(client: Any) -> None:
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, **GREEDY)
    text = full.choices[0].text
    stop = next(
        text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip() == text[i : i + 2]
    )
    cut = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=20, stop=[stop], **GREEDY
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: Any) -> None:
    def sample() -> list[str]:
        response = client.chat.completions.create(
            model="tiny",
            messages=USER,
            max_tokens=8,
            n=2,
            seed=11,
            temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        return [choice.message.content for choice in response.choices]

    assert sample() == sample()


def test_too_long_a_request_is_a_400_naming_the_parameter(server: BackgroundServer) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 100_000}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_client_disconnect_aborts_the_request(server: BackgroundServer) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=30) as response:
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
    wait_until(lambda: server.engine.stats().num_running == 0, 30, "the aborted request to leave the batch")
    assert metric_value(stats_of(server), "batchlm_requests_total", 'outcome="client_disconnect"') == 1.0


def test_metrics_expose_engine_stats(server: BackgroundServer) -> None:
    text = stats_of(server)
    assert metric_value(text, "batchlm_engine_ready") == 1.0
    generated = metric_value(text, "batchlm_generation_tokens_total")
    assert generated is not None and generated > 0
    assert metric_value(text, "batchlm_prefix_cache_queries_total") is not None


def test_prompt_tokens_count_once_per_completion_of_n(client: Any, server: BackgroundServer) -> None:
    # Each of the n completions prefills the prompt, and the torch scheduler counts it for each.
    before = metric_value(stats_of(server), "batchlm_prompt_tokens_total") or 0.0
    response = client.completions.create(
        model="tiny", prompt="Count this prompt for every completion", max_tokens=2, n=3, **GREEDY
    )
    after = metric_value(stats_of(server), "batchlm_prompt_tokens_total")
    assert after == before + 3 * response.usage.prompt_tokens
