"""The most input characters one token can stand for, when the tokenizer's pipeline guarantees a bound.

A text longer than max_model_len x that many characters cannot fit the context whatever its content,
so the server rejects it without tokenizing it (a 10 MB prompt would otherwise cost seconds of CPU).
The bound must never reject a text that could fit, so it is given only for pipelines where every
input character ends up in some token: no normalizer or pre-tokenizer that deletes characters, and
no unknown token that can absorb a run of characters of any length. Anything else gets None.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Normalizers that never shrink a text (Replace is checked separately: its pattern must not be longer
# than its replacement).
GROWING_NORMALIZERS = {"Sequence", "Prepend", "NFD", "NFKD", "Lowercase", "Replace"}
# Composing normalizers: NFC/NFKC turn up to 3 code points into one (Hangul L+V+T jamo, a letter with
# two combining marks), so a token may stand for up to that many times its own length.
COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
COMPOSITION_FACTOR = 4
# Pre-tokenizers that only split (every character stays in some piece).
SPLITTING_PRE_TOKENIZERS = {"Sequence", "ByteLevel", "Metaspace", "Digits", "Punctuation", "Split"}


def max_chars_per_token(hf: PreTrainedTokenizerBase) -> int | None:
    """An upper bound on the input characters one token of `hf` covers, or None when none is known.

    A token's vocabulary string is at least as long as the text it decodes to (byte-level BPE spells
    each byte as one character, SentencePiece each character as itself, byte-fallback pieces as
    "<0xNN>"), and each added token matches its literal content."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None
    pre_tokenizer = _state(backend.pre_tokenizer)
    factor = _normalizer_factor(_state(backend.normalizer))
    if factor is None or not _pre_tokenizer_keeps_characters(pre_tokenizer):
        return None
    if not _model_covers_every_character(backend.model, pre_tokenizer):
        return None
    longest = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=1)
    return max(1, longest) * factor


def _state(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's configuration as tokenizer.json spells it (None if absent)."""
    if component is None:
        return None
    state: dict[str, Any] = json.loads(component.__getstate__())
    return state


def _nodes(node: Any, children: str) -> list[dict[str, Any]]:
    """A component and, through Sequences, all its parts."""
    found, pending = [], [node] if node else []
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(current.get(children) or [])
    return found


def _normalizer_factor(normalizer: dict[str, Any] | None) -> int | None:
    factor = 1
    for node in _nodes(normalizer, "normalizers"):
        kind = node.get("type")
        if kind in COMPOSING_NORMALIZERS:
            factor = COMPOSITION_FACTOR
        elif kind not in GROWING_NORMALIZERS or (kind == "Replace" and not _replace_grows(node)):
            return None
    return factor


def _replace_grows(node: dict[str, Any]) -> bool:
    pattern = node.get("pattern") or {}
    return "String" in pattern and len(str(node.get("content", ""))) >= len(pattern["String"])


def _pre_tokenizer_keeps_characters(pre_tokenizer: dict[str, Any] | None) -> bool:
    for node in _nodes(pre_tokenizer, "pretokenizers"):
        if node.get("type") not in SPLITTING_PRE_TOKENIZERS or node.get("behavior") == "Removed":
            return False
    return True


def _model_covers_every_character(model: Any, pre_tokenizer: dict[str, Any] | None) -> bool:
    """True unless an unknown token could stand for a run of characters: byte-level input has no
    unknowns, byte fallback spells them as bytes, and an unfused unknown token covers one character."""
    kind = type(model).__name__
    if any(node.get("type") == "ByteLevel" for node in _nodes(pre_tokenizer, "pretokenizers")):
        return kind == "BPE"
    if kind not in ("BPE", "Unigram"):
        return False
    byte_fallback = bool(getattr(model, "byte_fallback", False))
    return byte_fallback or (kind == "BPE" and not getattr(model, "fuse_unk", True))
