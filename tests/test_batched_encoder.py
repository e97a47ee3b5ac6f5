"""Prompt tokenization off the event loop: Tokenizer.encode_many equals encode, and the server's
BatchedEncoder folds concurrent requests into few encode_many calls, failing only a bad text's request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchlm.server.prompts import encode_text
from batchlm.tokenizer.batched_encoder import BatchedEncoder
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


class FakeClock:
    """A clock that moves only when told, so time budgets do not depend on the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingTokenizer:
    """Wraps a Tokenizer, counting encode_many calls; a text equal to BAD fails to encode. Each
    single encode advances the clock by encode_delay_s."""

    BAD = "BAD" * 300

    def __init__(self, inner: Tokenizer, encode_delay_s: float = 0.0, clock: FakeClock | None = None) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.single_calls = 0
        self.encode_delay_s = encode_delay_s
        self.clock = clock or FakeClock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.single_calls += 1
        self.clock.advance(self.encode_delay_s)
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
        encoder = BatchedEncoder(counting, asyncio.get_running_loop(), inline_budget_s=0.0)
        return await asyncio.gather(*(encoder.encode(text, i % 2 == 0) for i, text in enumerate(texts)))

    results = asyncio.run(scenario())
    assert results == [tiny_tokenizer.encode(text, i % 2 == 0) for i, text in enumerate(texts)]
    assert sum(counting.batches) == len(texts) and len(counting.batches) <= 4


def test_a_text_that_fails_fails_only_its_own_request(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)
    texts = ["fine text " * 60, CountingTokenizer.BAD, "another fine text " * 40]

    async def scenario() -> list[Any]:
        encoder = BatchedEncoder(counting, asyncio.get_running_loop(), inline_budget_s=0.0)
        return await asyncio.gather(*(encoder.encode(text, True) for text in texts), return_exceptions=True)

    first, bad, last = asyncio.run(scenario())
    assert first == tiny_tokenizer.encode(texts[0]) and last == tiny_tokenizer.encode(texts[2])
    assert isinstance(bad, ValueError)


def test_lone_requests_are_tokenized_on_the_loop_without_a_worker(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)

    async def scenario() -> tuple[list[int], list[int]]:
        return await encode_text(counting, "short", True), await encode_text(counting, "long " * 200, True)

    short, long = asyncio.run(scenario())
    assert short == tiny_tokenizer.encode("short") and long == tiny_tokenizer.encode("long " * 200)
    assert counting.batches == [] and counting.single_calls == 2


def test_a_burst_beyond_the_inline_budget_goes_to_the_worker(tiny_tokenizer: Tokenizer) -> None:
    # Each inline encode takes 4 ms on the fake clock, so a 10 ms budget takes in the first three texts.
    counting = CountingTokenizer(tiny_tokenizer, encode_delay_s=0.004)
    texts = [f"request {i}: " + "lorem ipsum dolor " * 40 for i in range(24)]

    async def scenario() -> list[Any]:
        encoder = BatchedEncoder(
            counting,
            asyncio.get_running_loop(),
            inline_budget_s=0.010,
            inline_window_s=60,
            clock=counting.clock,
        )
        return await asyncio.gather(*(encoder.encode(text, True) for text in texts))

    assert asyncio.run(scenario()) == [tiny_tokenizer.encode(text) for text in texts]
    assert counting.single_calls == 3
    assert sum(counting.batches) == len(texts) - 3 and len(counting.batches) <= 3


def test_the_inline_budget_renews_with_each_window(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer, encode_delay_s=0.004)
    text = "lorem ipsum dolor " * 40

    async def scenario() -> None:
        encoder = BatchedEncoder(
            counting,
            asyncio.get_running_loop(),
            inline_budget_s=0.001,
            inline_window_s=0.05,
            clock=counting.clock,
        )
        await encoder.encode(text, True)  # inline: the budget is spent
        await encoder.encode(text, True)  # the worker
        counting.clock.advance(0.06)
        await encoder.encode(text, True)  # a new window: inline again

    asyncio.run(scenario())
    assert counting.single_calls == 2 and counting.batches == [1]
