"""Tests for batchlm.tokenizer: the offline BPE builder, the Tokenizer wrapper, chat templates, token bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlm.tokenizer.builder import (
    DEFAULT_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_tokenizer,
    special_token_ids,
)
from batchlm.tokenizer.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HARD_TEXTS = [
    "Hello, world!",
    "家族 👩‍👩‍👧‍👦 and 🏳️‍🌈 flags 🇫🇷",
    "e\u0301 n\u0303 Z\u0351\u0362a\u0337lgo",
    "  leading and trailing spaces  \n\ttabs\r\n",
    "مرحبا بالعالم — Привет, мир — नमस्ते",
    "\x00\x07 control \x7f bytes",
]
USER_HI = [{"role": "user", "content": "Hi!"}]


def tokenizer_dir(tmp_path: Path, source: Path, generation: dict | None, config: dict | None = None) -> Path:
    """A directory with the tiny tokenizer files and the given generation_config / config contents."""
    directory = tmp_path / "tok"
    directory.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, directory / name)
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


# --- builder ------------------------------------------------------------------------------------


def test_builder_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_builder_special_tokens_and_size(tiny_tokenizer: Tokenizer) -> None:
    hf = tiny_tokenizer.hf
    assert len(hf) == DEFAULT_VOCAB_SIZE == tiny_tokenizer.vocab_size
    for token, token_id in special_token_ids().items():
        assert hf.convert_tokens_to_ids(token) == token_id
        assert tiny_tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert tiny_tokenizer.bos_token_id == 0


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE - 1, 100_000])
def test_builder_rejects_unreachable_vocab_sizes(tmp_path: Path, vocab_size: int) -> None:
    with pytest.raises(ValueError, match="vocab"):
        build_tokenizer(tmp_path, vocab_size=vocab_size)


def test_builder_smaller_vocab_and_custom_template(tmp_path: Path) -> None:
    build_tokenizer(
        tmp_path, vocab_size=512, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.vocab_size == 512
    assert tokenizer.render_chat_template(USER_HI, add_generation_prompt=False) == "[Hi!]"


# --- encode / decode ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_any_unicode_round_trips(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text
    with_bos = tiny_tokenizer.encode(text)
    assert with_bos == [0, *ids]
    assert tiny_tokenizer.decode(with_bos, skip_special_tokens=False) == "<|begin_of_text|>" + text
    if not any(token in text for token in SPECIAL_TOKENS):
        assert tiny_tokenizer.decode(with_bos) == text


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_hard_texts_round_trip(tiny_tokenizer: Tokenizer, text: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, DEFAULT_VOCAB_SIZE - 1), max_size=20), skip=st.booleans())
def test_fast_decode_matches_transformers(tiny_tokenizer: Tokenizer, ids: list[int], skip: bool) -> None:
    assert tiny_tokenizer.decode(ids, skip_special_tokens=skip) == tiny_tokenizer.hf.decode(
        ids, skip_special_tokens=skip
    )


def test_text_with_a_lone_surrogate_is_a_value_error_that_says_so(tiny_tokenizer: Tokenizer) -> None:
    # "\ud800" (a JSON escape of no character, say) is not Unicode text: the Rust tokenizer's own
    # TypeError ("TextEncodeInput must be Union[...]") would leave the offline caller guessing.
    with pytest.raises(ValueError, match=r"lone UTF-16 surrogate \('\\ud800' at character 2\)"):
        tiny_tokenizer.encode("ab\ud800")
    with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
        tiny_tokenizer.encode_many(["fine", "x\udfff"])


def test_decode_ignores_ids_past_the_vocabulary(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("ok", add_special_tokens=False)
    assert tiny_tokenizer.decode([*ids, DEFAULT_VOCAB_SIZE + 5]) == "ok"


# --- loading and EOS ids --------------------------------------------------------------------------


def test_tiny_model_eos_ids(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.eos_token_ids == (1, 3)


@pytest.mark.parametrize(
    ("generation", "config", "expected"),
    [
        ({"eos_token_id": 3}, None, (3, 1)),  # an int, plus the tokenizer's own eos
        ({"eos_token_id": [5, 1, 7]}, None, (5, 1, 7)),  # a list already holding the tokenizer's
        (None, {"eos_token_id": 9}, (9, 1)),  # no generation config: config.json
        ({"bos_token_id": 0}, {"eos_token_id": [4]}, (4, 1)),  # generation config without eos
        (None, None, (1,)),  # only the tokenizer's
    ],
)
def test_eos_ids_union(
    tmp_path: Path, tiny_model_dir, generation: dict | None, config: dict | None, expected: tuple[int, ...]
) -> None:
    directory = tokenizer_dir(tmp_path, tiny_model_dir("llama"), generation, config)
    assert Tokenizer.from_pretrained(directory).eos_token_ids == expected


def test_eos_ids_are_the_model_s_with_another_tokenizer_or_generation_config(
    tmp_path: Path, tiny_model_dir
) -> None:
    from batchlm.config import EngineConfig
    from batchlm.models.model_source import load_tokenizer

    model_dir = tiny_model_dir("llama")  # its generation_config.json ends at 1 and 3
    # A tokenizer-only directory (--tokenizer) states no EOS ids: the model's still end generation.
    tokenizer_only = tokenizer_dir(tmp_path, model_dir, None)
    config = EngineConfig(model=str(model_dir), tokenizer=str(tokenizer_only))
    assert load_tokenizer(config, model_dir).eos_token_ids == (1, 3)
    # A --generation-config directory's eos_token_id replaces the model's, as in vLLM.
    other = tmp_path / "generation"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}))
    config = EngineConfig(model=str(model_dir), generation_config=str(other))
    assert load_tokenizer(config, model_dir).eos_token_ids == (7, 1)
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.5}))
    assert load_tokenizer(config, model_dir).eos_token_ids == (1, 3)


def test_bad_eos_id_is_reported(tmp_path: Path, tiny_model_dir) -> None:
    directory = tokenizer_dir(tmp_path, tiny_model_dir("llama"), {"eos_token_id": "</s>"})
    with pytest.raises(ValueError, match=r"eos_token_id in .*generation_config\.json must be an int"):
        Tokenizer.from_pretrained(directory)


def test_a_config_file_that_is_no_object_is_named(tmp_path: Path, tiny_model_dir) -> None:
    directory = tokenizer_dir(tmp_path, tiny_model_dir("llama"), None)
    (directory / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config\.json must hold a JSON object"):
        Tokenizer.from_pretrained(directory)


def test_missing_directory_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
