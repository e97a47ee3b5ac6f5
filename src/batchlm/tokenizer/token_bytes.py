"""The raw bytes of single tokens (for logprobs), whatever the tokenizer's text encoding of bytes."""

from __future__ import annotations

import json
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
        self._added = {int(i): t.content for i, t in getattr(hf, "added_tokens_decoder", {}).items()}
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
