"""Prompt tokenization off the event loop: Tokenizer.encode_many equals encode, and the server's
BatchedEncoder folds concurrent requests into few encode_many calls, failing only a bad text's request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchlm.server.prompts import BatchedEncoder, encode_text
from batchlm.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    " leading space and  two spaces\n\ttabs",
    "special tokens <|im_start|>user<|im_end|> inside, ünïcode 🦊 and 跳过",
    "",
    "x" * 2000,
]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_many_equals_encode(tiny_tokenizer: Tokenizer, add_special_tokens: bool) -> None:
    assert tiny_tokenizer._encode_backend is not None  # the built-in tokenizer takes the Rust path
    expected = [tiny_tokenizer.encode(text, add_special_tokens) for text in TEXTS]
    assert tiny_tokenizer.encode_many(TEXTS, add_special_tokens) == expected


class CountingTokenizer:
    """Wraps a Tokenizer, counting encode_many calls; a text equal to BAD fails to encode."""

    BAD = "BAD" * 300

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text == self.BAD:
            raise ValueError("cannot encode this text")
        return self.inner.encode(text, add_special_tokens)

    def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        self.batches.append(len(texts))
        if self.BAD in texts:
            raise ValueError("cannot encode this text")
        return self.inner.encode_many(texts, add_special_tokens)


def test_concurrent_requests_are_encoded_in_few_batches(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)
    texts = [f"request {i}: " + "lorem ipsum dolor " * 40 for i in range(64)]

    async def scenario() -> list[Any]:
        encoder = BatchedEncoder(counting, asyncio.get_running_loop())
        return await asyncio.gather(*(encoder.encode(text, i % 2 == 0) for i, text in enumerate(texts)))

    results = asyncio.run(scenario())
    assert results == [tiny_tokenizer.encode(text, i % 2 == 0) for i, text in enumerate(texts)]
    assert sum(counting.batches) == len(texts) and len(counting.batches) <= 4


def test_a_text_that_fails_fails_only_its_own_request(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)
    texts = ["fine text " * 60, CountingTokenizer.BAD, "another fine text " * 40]

    async def scenario() -> list[Any]:
        encoder = BatchedEncoder(counting, asyncio.get_running_loop())
        return await asyncio.gather(*(encoder.encode(text, True) for text in texts), return_exceptions=True)

    first, bad, last = asyncio.run(scenario())
    assert first == tiny_tokenizer.encode(texts[0]) and last == tiny_tokenizer.encode(texts[2])
    assert isinstance(bad, ValueError)


def test_encode_text_goes_through_the_batch_only_for_long_texts(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)

    async def scenario() -> tuple[list[int], list[int]]:
        return await encode_text(counting, "short", True), await encode_text(counting, "long " * 200, True)

    short, long = asyncio.run(scenario())
    assert short == tiny_tokenizer.encode("short") and long == tiny_tokenizer.encode("long " * 200)
    assert counting.batches == [1]
