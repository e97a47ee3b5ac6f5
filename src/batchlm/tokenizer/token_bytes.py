"""The raw bytes of single tokens (for logprobs), whatever the tokenizer's text encoding of bytes."""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_SPACE = "\u2581"


def byte_level_alphabet() -> dict[str, int]:
    """Map each printable stand-in character of byte-level BPE (GPT-2's scheme) back to its byte.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space, a few gaps)
    are shifted to code points 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    kept = set(printable)
    alphabet = {chr(b): b for b in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in kept:
            alphabet[chr(next_code_point)] = byte
            next_code_point += 1
    return alphabet


class TokenBytes:
    """Callable: token id -> the bytes it adds to decoded text (b"" for ids outside the vocabulary).

    Added tokens (special or not) are their literal content. Vocabulary tokens are read according to
    the backend's decoder: byte-level BPE stand-in characters, SentencePiece '▁' spaces and <0xNN>
    byte-fallback pieces; other tokenizers fall back to decoding the single token.
    """

    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        self._hf = hf
        self._added: dict[int, str] = {
            int(i): t.content for i, t in getattr(hf, "added_tokens_decoder", {}).items()
        }
        kinds = _decoder_kinds(hf)
        self._byte_level = byte_level_alphabet() if "ByteLevel" in kinds else None
        self._sentencepiece = bool(kinds & {"Metaspace", "ByteFallback", "Replace"})
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token: object = self._hf.convert_ids_to_tokens(token_id)
        if isinstance(token, bytes):  # tiktoken-style tokenizers already speak bytes
            return token
        if not isinstance(token, str):  # None: the id is outside the vocabulary
            return b""
        if self._byte_level is not None:
            alphabet = self._byte_level
            return b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode("utf-8") for c in token)
        if self._sentencepiece:
            fallback = _BYTE_FALLBACK.fullmatch(token)
            if fallback:
                return bytes([int(fallback.group(1), 16)])
            return token.replace(_SENTENCEPIECE_SPACE, " ").encode("utf-8")
        return str(self._hf.decode([token_id])).encode("utf-8")


def _decoder_kinds(hf: PreTrainedTokenizerBase) -> set[str]:
    """Type names of the backend decoder and, for a Sequence, of its parts."""
    backend = getattr(hf, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    kinds: set[str] = set()
    pending = [json.loads(decoder.__getstate__())]
    while pending:
        node = pending.pop()
        kinds.add(str(node.get("type", "")))
        pending.extend(node.get("decoders", []) or [])
    return kinds


def byte_level_pieces(
    hf: PreTrainedTokenizerBase, token_bytes: TokenBytes, skip_special_tokens: bool
) -> dict[int, bytes] | None:
    """id -> the bytes that id adds to decoded text, for a byte-level BPE tokenizer (GPT-2, Llama 3,
    Qwen) whose Rust decode is exactly the UTF-8 decoding (invalid bytes as U+FFFD) of the
    concatenation; special tokens map to b"" when skipped. None for any other tokenizer.

    Checked, not assumed: the decoder is a lone ByteLevel, every vocabulary string is made of the
    byte-level stand-in characters, every added token decodes to its piece, and random id sequences
    (which split characters and hold invalid bytes) decode to the joined pieces. Ids outside the
    vocabulary decode to nothing, as they do in decode()."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or _decoder_kinds(hf) != {"ByteLevel"}:
        return None
    alphabet = byte_level_alphabet()
    vocab = backend.get_vocab(with_added_tokens=False)
    if not set("".join(vocab)) <= alphabet.keys():
        return None
    # Stand-in character -> the Latin-1 character of its byte, so that encoding as Latin-1 gives the bytes.
    to_latin1 = {ord(char): byte for char, byte in alphabet.items()}
    pieces = {int(i): token.translate(to_latin1).encode("latin-1") for token, i in vocab.items()}
    added = getattr(hf, "added_tokens_decoder", {})
    for i, token in added.items():
        pieces[int(i)] = b"" if (skip_special_tokens and token.special) else token_bytes(int(i))
        if backend.decode([int(i)], skip_special_tokens=skip_special_tokens) != pieces[int(i)].decode(
            "utf-8", "replace"
        ):
            return None
    rng = random.Random(0)
    ids = sorted(pieces)
    for length in (1, 2, 3, 5, 8, 13, 21) * 8:
        sample = rng.choices(ids, k=length)
        joined = b"".join(pieces[i] for i in sample).decode("utf-8", "replace")
        if backend.decode(sample, skip_special_tokens=skip_special_tokens) != joined:
            return None
    return pieces
