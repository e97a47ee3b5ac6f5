"""Long texts never hold up the event loop: a text too long for the context by its length alone is
rejected before any tokenization, by a character bound that never rejects a text that could fit, and
the long texts that are tokenized are tokenized off the loop, so /health and other streams go on."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from batchlm.server.background import BackgroundServer
from batchlm.server.prompts import DECODE_OFFLOAD_TOKENS
from batchlm.tokenizer.batched_encoder import INLINE_MAX_CHARS, BatchedEncoder
from batchlm.tokenizer.text_bound import COMPOSITION_FACTOR, max_chars_per_token
from batchlm.tokenizer.tokenizer import Tokenizer
from fake_engine import FakeEngine, FakeTokenizer
from gated_work import Gate, answered_while_held

TEN_MB = 10 * 1024 * 1024


class SpyTokenizer(FakeTokenizer):
    """Counts the characters it is asked to tokenize; with a gate, encoding a long text waits on it."""

    def __init__(self, gate: Gate | None = None) -> None:
        super().__init__()
        self.encoded_chars = 0
        self.decoded_ids = 0
        self.gate = gate

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded_chars += len(text)
        if self.gate is not None and len(text) > INLINE_MAX_CHARS:
            self.gate.hold()
        return super().encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_ids += len(ids)
        if self.gate is not None and len(ids) > DECODE_OFFLOAD_TOKENS:
            self.gate.hold()
        return super().decode(ids, skip_special_tokens)


# -- the bound ----------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    text=st.text(max_size=300)
    | st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(1, 60))
)
def test_no_text_needs_fewer_tokens_than_the_bound_says(tiny_tokenizer: Tokenizer, text: str) -> None:
    bound = tiny_tokenizer.max_chars_per_token
    assert bound is not None
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) * bound >= len(text)


def test_the_longest_tokens_repeated_stay_within_the_bound(tiny_tokenizer: Tokenizer) -> None:
    bound = tiny_tokenizer.max_chars_per_token
    assert bound is not None
    longest = sorted(range(tiny_tokenizer.vocab_size), key=lambda i: -len(tiny_tokenizer.decode([i], False)))
    for token_id in longest[:20]:
        text = tiny_tokenizer.decode([token_id], skip_special_tokens=False) * 50
        assert len(tiny_tokenizer.encode(text, add_special_tokens=False)) * bound >= len(text)


def _hf(model: Any, normalizer: Any = None, pre_tokenizer: Any = None) -> PreTrainedTokenizerFast:
    rust = RustTokenizer(model)
    if normalizer is not None:
        rust.normalizer = normalizer
    if pre_tokenizer is not None:
        rust.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=rust)


BPE_VOCAB = {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "▁": 4, "▁ab": 5}


def test_pipelines_that_can_drop_characters_get_no_bound() -> None:
    wordpiece = models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    assert max_chars_per_token(_hf(wordpiece, pre_tokenizer=pre_tokenizers.Whitespace())) is None
    fused = models.BPE(BPE_VOCAB, [], unk_token="<unk>", fuse_unk=True)
    assert max_chars_per_token(_hf(fused, pre_tokenizer=pre_tokenizers.Metaspace())) is None
    kept = models.BPE(BPE_VOCAB, [("a", "b")], unk_token="<unk>", byte_fallback=True)
    assert max_chars_per_token(_hf(kept, normalizers.Strip(), pre_tokenizers.Metaspace())) is None


def test_composing_normalizers_widen_the_bound() -> None:
    plain = models.BPE(BPE_VOCAB, [("a", "b")], unk_token="<unk>", byte_fallback=True)
    assert max_chars_per_token(_hf(plain, pre_tokenizer=pre_tokenizers.Metaspace())) == 5  # "<unk>"
    composed = models.BPE(BPE_VOCAB, [("a", "b")], unk_token="<unk>", byte_fallback=True)
    hf = _hf(composed, normalizers.NFC(), pre_tokenizers.Metaspace())
    assert max_chars_per_token(hf) == 5 * COMPOSITION_FACTOR


# -- the server ---------------------------------------------------------------------------------------


def test_a_10_mb_message_is_rejected_without_tokenizing_it_while_health_answers() -> None:
    """The goal is /health answering within 100 ms while a 10 MB prompt is rejected. Speed varies from
    machine to machine, so this pins what makes that hold: the 10 MB texts are never tokenized (the spy
    sees none of them), and /health requests sent while they are being read and rejected all answer.
    The latencies are collected and only checked against a bound far above any stall tokenizing would
    not cause (tokenizing 10 MB takes 17-46 s)."""
    spy = SpyTokenizer()
    big = "x" * TEN_MB
    with BackgroundServer(FakeEngine(tokenizer=spy, max_model_len=64)) as server:

        async def scenario() -> tuple[list[httpx.Response], list[float]]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
                bodies = [
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}),
                    ("/v1/completions", {"prompt": big}),
                    ("/tokenize", {"prompt": big}),
                ]
                posts = [asyncio.ensure_future(client.post(path, json=body)) for path, body in bodies]
                latencies = []
                while not all(post.done() for post in posts):
                    started = time.perf_counter()
                    assert (await client.get("/health")).status_code == 200
                    latencies.append(time.perf_counter() - started)
                return [await post for post in posts], latencies

        responses, latencies = asyncio.run(scenario())
    for response in responses:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
    assert spy.encoded_chars == 0
    assert latencies and max(latencies) < 10.0


def test_the_real_tokenizer_bound_rejects_a_10_mb_prompt_unread(
    tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lengths: list[int] = []  # of every text or batch the tokenizer is given

    def spy(original: Any) -> Any:
        return lambda text, *args, **kwargs: lengths.append(len(text)) or original(text, *args, **kwargs)

    for name in ("encode", "encode_many"):
        monkeypatch.setattr(tiny_tokenizer, name, spy(getattr(tiny_tokenizer, name)))
    with BackgroundServer(FakeEngine(tokenizer=tiny_tokenizer, max_model_len=64)) as server:
        response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x" * TEN_MB}, timeout=120)
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
        fits = "hello world"  # within the bound: tokenized, and fits
        assert (
            httpx.post(
                f"{server.base_url}/v1/completions", json={"prompt": fits, "max_tokens": 1}
            ).status_code
            == 200
        )
    assert lengths and max(lengths) < 100  # the short prompt (and the fake's reply), never the 10 MB


def test_a_token_prompt_over_the_context_is_refused_before_its_ids_are_walked() -> None:
    spy = SpyTokenizer()
    with BackgroundServer(FakeEngine(tokenizer=spy, max_model_len=64)) as server:
        body = {"prompt": [70] * 200_000, "echo": True}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert spy.decoded_ids == 0


def test_a_long_detokenize_is_decoded_off_the_event_loop() -> None:
    gate = Gate()
    spy = SpyTokenizer(gate)
    tokens = [70] * (4 * DECODE_OFFLOAD_TOKENS)
    with BackgroundServer(FakeEngine(tokenizer=spy)) as server:
        response = answered_while_held(
            server, gate, lambda client: client.post("/detokenize", json={"tokens": tokens})
        )
    assert response.json()["prompt"] == "C" * len(tokens)  # id 70 is the byte 67, "C"


def test_a_long_prompt_is_tokenized_off_the_event_loop() -> None:
    """The tokenizer blocks (on a gate) while it encodes the long prompt; /health must still answer,
    which it cannot if the event loop is the thread doing the encoding."""
    gate = Gate()
    spy = SpyTokenizer(gate)
    body = {"prompt": "y" * (4 * INLINE_MAX_CHARS), "max_tokens": 1}
    with BackgroundServer(FakeEngine(tokenizer=spy, max_model_len=8 * INLINE_MAX_CHARS)) as server:
        response = answered_while_held(server, gate, lambda client: client.post("/v1/completions", json=body))
    assert response.status_code == 200


def test_the_inline_budget_never_takes_a_text_over_the_inline_limit() -> None:
    spy = SpyTokenizer()
    spy.encode_many = lambda texts, add_special_tokens=True: [[len(t)] for t in texts]  # type: ignore[method-assign]

    async def scenario() -> list[int]:
        encoder = BatchedEncoder(spy, asyncio.get_running_loop(), inline_budget_s=60.0)
        return await encoder.encode("z" * (INLINE_MAX_CHARS + 1), True)

    assert asyncio.run(scenario()) == [INLINE_MAX_CHARS + 1]  # encode_many's answer: the worker's
    assert spy.encoded_chars == 0
