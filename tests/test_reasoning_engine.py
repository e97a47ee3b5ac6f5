"""A thinking model end to end on the tiny random-weight model: a chat template that closes thinking
blocks (so `--reasoning-parser auto` reads them), `<think>`/`</think>` as added tokens, and a JSON
schema that must hold after the thinking, through the engine's grammar masks and the server."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from batchlm.config import EngineConfig
from batchlm.engine.async_engine import AsyncLLMEngine
from batchlm.server.background import BackgroundServer
from live_server import serving

pytestmark = pytest.mark.slow

# `open_thinking` makes the generation prompt open the block, as DeepSeek-R1's does.
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if open_thinking %}<think>\n{% endif %}{% endif %}"
    "{# an assistant turn's thinking ends at </think> #}"
)
SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def thinking_model(tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model_dir("llama", vocab_size=2080), directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # Added, not special (Qwen3's kind), in rows of the padded vocabulary the tokenizer leaves unused.
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(thinking_model: Path) -> Iterator[BackgroundServer]:
    engine = AsyncLLMEngine(EngineConfig(model=str(thinking_model), device="cpu"), multiprocess=False)
    with serving(engine) as running:
        yield running


def token_id(model: Path, text: str) -> int:
    return int(AutoTokenizer.from_pretrained(model).convert_tokens_to_ids(text))


def chat(server: BackgroundServer, **fields: Any) -> dict[str, Any]:
    body = {
        "model": server.engine.model_info.served_model_name,
        "messages": [{"role": "user", "content": "Where?"}],
        "temperature": 0,
        "max_tokens": 48,
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}},
        **fields,
    }
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])


def test_the_model_thinks_then_answers_in_the_schema(server: BackgroundServer, thinking_model: Path) -> None:
    # The bias opens and closes the block at once; the grammar alone shapes the answer after it.
    think, end = token_id(thinking_model, "<think>"), token_id(thinking_model, "</think>")
    choice = chat(server, logit_bias={str(think): 100, str(end): 100})
    message = choice["message"]
    assert message["reasoning_content"] == ""
    assert json.loads(message["content"])["city"] in ("Paris", "Rome")
    assert choice["finish_reason"] == "stop"


def test_a_block_the_prompt_opened_closes_before_the_answer(
    server: BackgroundServer, thinking_model: Path
) -> None:
    end = token_id(thinking_model, "</think>")
    choice = chat(server, logit_bias={str(end): 100}, chat_template_kwargs={"open_thinking": True})
    message = choice["message"]
    assert message["reasoning_content"] == ""
    assert json.loads(message["content"])["city"] in ("Paris", "Rome")


def test_a_block_the_continued_message_opened_closes_before_the_answer(
    server: BackgroundServer, thinking_model: Path
) -> None:
    # The client wrote the start of the thinking; the grammar holds the answer until the block closes
    # (the model may not open another).
    think, end = token_id(thinking_model, "<think>"), token_id(thinking_model, "</think>")
    begun = [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "<think>\nHm"}]
    choice = chat(
        server,
        messages=begun,
        continue_final_message=True,
        add_generation_prompt=False,
        logit_bias={str(think): -100, str(end): 100},
    )
    message = choice["message"]
    assert message["reasoning_content"] == ""
    assert json.loads(message["content"])["city"] in ("Paris", "Rome")


def test_without_thinking_the_answer_is_the_whole_output(
    server: BackgroundServer, thinking_model: Path
) -> None:
    think = token_id(thinking_model, "<think>")
    choice = chat(server, logit_bias={str(think): -100})
    assert "reasoning_content" not in choice["message"]
    assert json.loads(choice["message"]["content"])["city"] in ("Paris", "Rome")
