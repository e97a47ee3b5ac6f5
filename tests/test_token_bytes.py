"""Tests for per-token bytes and text (logprobs' `bytes` and `token` fields)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode

from batchlm.tokenizer.builder import DEFAULT_VOCAB_SIZE
from batchlm.tokenizer.token_bytes import byte_level_alphabet
from batchlm.tokenizer.tokenizer import Tokenizer


def test_byte_level_alphabet_is_gpt2s() -> None:
    reference = {char: byte for byte, char in bytes_to_unicode().items()}
    assert byte_level_alphabet() == reference
    assert len(set(byte_level_alphabet().values())) == 256


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=40))
def test_token_bytes_concatenate_to_the_utf8_text(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(tiny_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_every_vocabulary_token_has_bytes(tiny_tokenizer: Tokenizer) -> None:
    for token_id in range(DEFAULT_VOCAB_SIZE):
        raw = tiny_tokenizer.token_bytes(token_id)
        assert raw, token_id
        # A token's text is its bytes decoded, with \xNN escapes only where the bytes are not UTF-8.
        assert tiny_tokenizer.token_to_text(token_id) == raw.decode("utf-8", errors="backslashreplace")


def test_token_text_of_partial_characters_and_special_tokens(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("你好世界", add_special_tokens=False)
    texts = [tiny_tokenizer.token_to_text(i) for i in ids]
    assert all("\ufffd" not in t for t in texts)
    assert any("\\x" in t for t in texts)  # the tiny vocabulary splits some of these characters
    assert tiny_tokenizer.token_to_text(3) == "<|im_end|>"
    assert tiny_tokenizer.token_bytes(0) == b"<|begin_of_text|>"
    space_hello = tiny_tokenizer.encode(" the", add_special_tokens=False)
    assert [tiny_tokenizer.token_to_text(i) for i in space_hello] == [" the"]


@pytest.mark.parametrize("token_id", [DEFAULT_VOCAB_SIZE, DEFAULT_VOCAB_SIZE + 100])
def test_ids_past_the_vocabulary_have_no_text(tiny_tokenizer: Tokenizer, token_id: int) -> None:
    assert tiny_tokenizer.token_bytes(token_id) == b""
    assert tiny_tokenizer.token_to_text(token_id) == ""
    assert tiny_tokenizer.convert_ids_to_tokens([5, token_id])[1] == ""


def test_convert_ids_to_tokens_gives_raw_vocabulary_strings(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(" the", add_special_tokens=False)
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["Ġthe"]
