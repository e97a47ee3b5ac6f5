"""Tests for IncrementalDetokenizer: the stated invariant, UTF-8 safety, stop strings, window size."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from batchlm.tokenizer.builder import DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS
from batchlm.tokenizer.detokenizer import IncrementalDetokenizer, complete_utf8_end
from batchlm.tokenizer.token_bytes import byte_level_alphabet
from batchlm.tokenizer.tokenizer import Tokenizer

FFFD = "\ufffd"
# Pieces that stress UTF-8 handling: multi-byte scripts, ZWJ and flag emoji, combining marks.
PIECES = [
    "a", "Hello", " world", ".", "\n", "  ", "é", "e\u0301", "n\u0303", "Z\u0351\u0362", "ß", "中", "文字",
    "日本語", "한국어", "مرحبا", "नमस्ते", "😀", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "\U0010fffd",
]  # fmt: skip
# Plain text: hypothesis also draws string literals from the code under test, and a special token's
# spelling ("<|im_end|>") encodes to that token, which decoding drops by design.
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="ascii"), max_size=30),
).filter(lambda text: not any(token in text for token in SPECIAL_TOKENS))
chunk_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=6)


def stream(
    detokenizer: IncrementalDetokenizer, ids: Sequence[int], sizes: Sequence[int]
) -> tuple[list[str], str]:
    """Feed ids in chunks of the given sizes (cycled); return the update deltas and finish()'s text."""
    deltas, position, turn = [], 0, 0
    while position < len(ids):
        size = sizes[turn % len(sizes)]
        deltas.append(detokenizer.update(ids[position : position + size]))
        position, turn = position + size, turn + 1
    return deltas, detokenizer.finish()


def first_stop(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Reference truncation: the stop string completed first in the whole text."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, _, stop = min(hits)
    return text[: end if include else end - len(stop)], stop


def single_byte_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte of `data` (the byte-level stand-in characters)."""
    stand_in = {byte: char for char, byte in byte_level_alphabet().items()}
    return [int(tokenizer.hf.convert_tokens_to_ids(stand_in[byte])) for byte in data]


def byte_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the 128 single-byte tokens that are not ASCII (lead, continuation and invalid bytes)."""
    return single_byte_ids(tokenizer, bytes(range(0x80, 0x100)))


@settings(max_examples=200, deadline=None)
@given(text=texts, sizes=chunk_sizes, prompt=texts)
def test_deltas_join_to_the_full_decode(
    tiny_tokenizer: Tokenizer, text: str, sizes: list[int], prompt: str
) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, tiny_tokenizer.encode(prompt))
    deltas, tail = stream(detokenizer, ids, sizes)
    assert "".join(deltas) + tail == tiny_tokenizer.decode(ids) == text
    assert detokenizer.output_text == text
    if FFFD not in text:
        assert all(FFFD not in delta for delta in [*deltas, tail])
    assert detokenizer.stop_reason is None


@settings(max_examples=200, deadline=None)
@given(data=st.data(), sizes=chunk_sizes, skip=st.booleans())
def test_invariant_holds_for_arbitrary_ids(
    tiny_tokenizer: Tokenizer, data, sizes: list[int], skip: bool
) -> None:
    # Random ids include lone lead/continuation bytes, tokens straddling characters and special tokens.
    tricky = st.sampled_from([0, 1, 2, 3, *byte_token_ids(tiny_tokenizer)])
    any_id = st.one_of(tricky, st.integers(0, DEFAULT_VOCAB_SIZE - 1))
    prompt = data.draw(st.lists(any_id, max_size=8))
    ids = data.draw(st.lists(any_id, max_size=24))
    for tokenizer in (tiny_tokenizer, WindowOnly(tiny_tokenizer)):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)  # type: ignore[arg-type]
        deltas, tail = stream(detokenizer, ids, sizes)
        full = tiny_tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == full
        # Emitted text is never rewritten: a character still incomplete (or text ending in U+FFFD
        # that might be one) is held back, so every prefix of the deltas is a prefix of the text.
        emitted = ""
        for delta in deltas:
            emitted += delta
            assert full.startswith(emitted)


class WindowOnly:
    """The tokenizer without byte_pieces: the detokenizer takes its window-decoding path."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner

    def decoder(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
        return self.inner.decoder(skip_special_tokens)

    def byte_pieces(self, skip_special_tokens: bool = True) -> None:
        return None


def test_byte_level_tokenizers_take_the_byte_path(
    tiny_tokenizer: Tokenizer, sentencepiece_tokenizer: Tokenizer
) -> None:
    pieces = tiny_tokenizer.byte_pieces(skip_special_tokens=True)
    assert pieces is not None
    assert pieces[tiny_tokenizer.encode("é", add_special_tokens=False)[0]] == "é".encode()
    assert pieces[1] == b""  # a special token, skipped
    assert tiny_tokenizer.byte_pieces(skip_special_tokens=False)[1] == tiny_tokenizer.token_bytes(1)  # type: ignore[index]
    assert sentencepiece_tokenizer.byte_pieces() is None


@pytest.mark.parametrize(
    ("data", "end"),
    [
        (b"", 0), (b"abc", 3), ("é".encode(), 2), ("é".encode()[:1], 0), (b"a" + "😀".encode()[:3], 1),
        ("😀".encode(), 4), (b"\x80\x80", 2), (b"a\xe2\x82", 1), (b"\xe2\x82\xac\x80", 4), (b"\xff", 1),
    ],
)  # fmt: skip
def test_complete_utf8_end_holds_only_a_character_that_may_still_complete(data: bytes, end: int) -> None:
    assert complete_utf8_end(data) == end
    whole = data.decode("utf-8", "replace")
    assert data[:end].decode("utf-8", "replace") + data[end:].decode("utf-8", "replace") == whole


def test_multibyte_character_is_held_until_complete(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("a😀", add_special_tokens=False)
    byte_ids = single_byte_ids(tiny_tokenizer, "😀".encode())  # F0 9F 98 80, byte by byte
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [])
    assert detokenizer.update(ids[:1]) == "a"
    assert [detokenizer.update([i]) for i in byte_ids] == ["", "", "", "😀"]


def test_prompt_ending_inside_a_character(tiny_tokenizer: Tokenizer) -> None:
    byte_ids = single_byte_ids(tiny_tokenizer, "你".encode())  # E4 BD A0
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [*tiny_tokenizer.encode("x"), byte_ids[0]])
    deltas, tail = stream(detokenizer, byte_ids[1:], [1])
    assert "".join(deltas) + tail == tiny_tokenizer.decode(byte_ids[1:]) == FFFD * 2


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from(["ab", "c", "Stop", "中", "😀", " ", "</s>", "<"]), max_size=14).map(
        "".join
    ),
    stops=st.lists(st.sampled_from(["Stop", "b c", "</s>", "中😀", "c中", "\n"]), max_size=3),
    sizes=chunk_sizes,
    include=st.booleans(),
)
def test_stop_strings_across_token_boundaries(
    tiny_tokenizer: Tokenizer, text: str, stops: list[str], sizes: list[int], include: bool
) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0], stop=stops, include_stop_str_in_output=include)
    deltas, tail = stream(detokenizer, ids, sizes)
    expected_text, expected_stop = first_stop(text, stops, include)
    assert "".join(deltas) + tail == expected_text == detokenizer.output_text
    assert detokenizer.stop_reason == expected_stop


def test_stop_string_is_held_back_then_dropped(tiny_tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0], stop=["STOP"])
    emitted = []
    for piece in ["Hello", " ST", "O", "P", " after"]:
        emitted.append(detokenizer.update(tiny_tokenizer.encode(piece, add_special_tokens=False)))
    assert "".join(emitted) == "Hello "
    assert "S" not in "".join(emitted)
    assert detokenizer.stop_reason == "STOP"
    assert detokenizer.update(tiny_tokenizer.encode(" more", add_special_tokens=False)) == ""
    assert detokenizer.finish() == ""
    assert detokenizer.output_text == "Hello "


@pytest.mark.parametrize("sizes", [[1], [2], [5], [1, 4]])
def test_a_stop_string_ends_only_past_the_first_min_tokens_tokens(
    tiny_tokenizer: Tokenizer, sizes: list[int]
) -> None:
    ids = tiny_tokenizer.encode("A", add_special_tokens=False) * 5
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0], stop=["A"], min_tokens=3)
    deltas, tail = stream(detokenizer, ids, sizes)
    # As vLLM has it: the 4th token's "A" is the first that may end the text.
    assert "".join(deltas) + tail == "AAA" == detokenizer.output_text
    assert detokenizer.stop_reason == "A"


def test_held_back_prefix_is_released_by_finish(tiny_tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0], stop=["STOP"])
    assert detokenizer.update(tiny_tokenizer.encode("Go ST", add_special_tokens=False)) == "Go "
    assert detokenizer.finish() == "ST"
    assert detokenizer.stop_reason is None
    assert detokenizer.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        detokenizer.update([5])


def test_include_stop_string(tiny_tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0], stop=["\n\n"], include_stop_str_in_output=True)
    deltas, tail = stream(detokenizer, tiny_tokenizer.encode("One.\n\nTwo.", add_special_tokens=False), [1])
    assert "".join(deltas) + tail == "One.\n\n"
    assert detokenizer.stop_reason == "\n\n"


@pytest.mark.parametrize(
    ("skip", "expected"), [(True, "Hi there"), (False, "Hi<|im_end|> there<|end_of_text|>")]
)
def test_skip_special_tokens(tiny_tokenizer: Tokenizer, skip: bool, expected: str) -> None:
    ids = [*tiny_tokenizer.encode("Hi", add_special_tokens=False), 3]
    ids += [*tiny_tokenizer.encode(" there", add_special_tokens=False), 1]
    detokenizer = IncrementalDetokenizer(tiny_tokenizer, [0, 2], skip_special_tokens=skip)
    deltas, tail = stream(detokenizer, ids, [1])
    assert "".join(deltas) + tail == expected


class CountingTokenizer:
    """Records the length of every id list the detokenizer decodes."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def decoder(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
        inner = self.inner.decoder(skip_special_tokens)

        def decode(token_ids: list[int]) -> str:
            self.lengths.append(len(token_ids))
            return inner(token_ids)

        return decode

    def byte_pieces(self, skip_special_tokens: bool = True) -> None:
        return None  # the window path, whose decodes are counted here


def test_work_per_update_does_not_grow_with_the_output(tiny_tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tiny_tokenizer)
    text = "The quick brown fox 跳过 the lazy dog 🦊. " * 40
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 400
    detokenizer = IncrementalDetokenizer(counting, list(range(100, 140)))  # type: ignore[arg-type]
    deltas, tail = stream(detokenizer, ids, [1, 3])
    assert "".join(deltas) + tail == text
    assert max(counting.lengths) <= 12  # a few tokens of context plus at most a held character
    assert len(counting.lengths) <= 2 * len(ids) + 2


# --- a SentencePiece-style tokenizer (Metaspace spaces, <0xNN> byte fallback, leading-space strip) ---


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for char in "▁abcdefghijklmnopqrstuvwxyzTPF.,":
        vocab[char] = len(vocab)
    merges = [("▁", "P"), ("▁P", "a"), ("r", "i"), ("ri", "s"), ("▁", "i"), ("▁i", "s")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return Tokenizer(hf)


def test_sentencepiece_output_continues_the_prompt(sentencepiece_tokenizer: Tokenizer) -> None:
    tokenizer = sentencepiece_tokenizer
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode(" Paris", add_special_tokens=False)[1:]  # drop the normalizer's own '▁'
    assert tokenizer.convert_ids_to_tokens(output) == ["▁Pa", "ris"]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas, tail = stream(detokenizer, output, [1])
    assert (deltas, tail) == ([" Pa", "ris"], "")
    assert tokenizer.decode(output) == "Paris"  # decoded alone, the leading space is stripped


@settings(max_examples=100, deadline=None)
@given(
    text=st.lists(st.sampled_from(["a", " is", " Paris", "é", "中", "😀", ", "]), max_size=10).map("".join)
)
def test_sentencepiece_byte_fallback_is_utf8_safe(sentencepiece_tokenizer: Tokenizer, text: str) -> None:
    ids = sentencepiece_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(sentencepiece_tokenizer, [])
    deltas, tail = stream(detokenizer, ids, [1])
    assert "".join(deltas) + tail == sentencepiece_tokenizer.decode(ids)
    assert all(FFFD not in delta for delta in deltas)


def test_sentencepiece_token_bytes(sentencepiece_tokenizer: Tokenizer) -> None:
    ids = sentencepiece_tokenizer.encode(" is é", add_special_tokens=False)
    assert b"".join(sentencepiece_tokenizer.token_bytes(i) for i in ids) == "  is é".encode()


def test_a_failing_byte_level_check_falls_back_to_window_decoding(
    tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchlm.tokenizer.tokenizer as tokenizer_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("an unusual tokenizer")

    monkeypatch.setattr(tokenizer_module, "byte_level_pieces", broken)
    fresh = Tokenizer(tiny_tokenizer.hf)
    assert fresh.byte_pieces() is None
    ids = tiny_tokenizer.encode("still decodes 😀", add_special_tokens=False)
    deltas, tail = stream(IncrementalDetokenizer(fresh, []), ids, [1])
    assert "".join(deltas) + tail == "still decodes 😀"
