"""Log-probabilities in OpenAI's two formats: chat (`content: [{token, logprob, bytes, top_logprobs}]`)
and legacy completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)."""

from __future__ import annotations

import codecs
import math
from collections.abc import Collection, Sequence

from batchlm.outputs import TokenLogprobs
from batchlm.server.responses import (
    ChatChoiceLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)
from batchlm.tokenizer.detokenizer import complete_utf8_end
from batchlm.tokenizer.tokenizer import Tokenizer

# OpenAI reports impossible tokens with this floor instead of -inf (JSON has no infinities).
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else logprob


def _token_bytes(tokenizer: Tokenizer, token_id: int, text: str) -> bytes:
    """The exact bytes of a token (a part of a multi-byte character has no text of its own), from the
    tokenizer's token_bytes() where it has one, else the UTF-8 of its text."""
    exact = getattr(tokenizer, "token_bytes", None)
    return bytes(exact(token_id)) if exact is not None else text.encode("utf-8", errors="replace")


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top_n: int
) -> ChatChoiceLogprobs:
    """One entry per generated token, each with its `top_n` most likely alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=True):
        top = [_top_logprob(tokenizer, alt_id, lp) for alt_id, lp in entry.top[:top_n]]
        sampled = _top_logprob(tokenizer, token_id, entry.logprob)
        content.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


def _top_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    text = tokenizer.token_to_text(token_id)
    token_bytes = list(_token_bytes(tokenizer, token_id, text))
    return TopLogprob(token=text, logprob=_finite(logprob), bytes=token_bytes)


class CompletionLogprobsBuilder:
    """Builds completions-format logprobs for one choice, delta by delta; `text_offset` keeps counting
    across deltas (and starts after an echoed prompt).

    An offset counts the characters of the text before its token, not the length of the token strings
    before it: a token holding part of a multi-byte character shows as \\xNN escapes, several characters
    long, while the character it helps to spell takes one place in the text. Such a token's offset is
    that of the character its first byte belongs to. A prompt echoed as the client wrote it (`spelled`)
    does not hold the added tokens its encoding put around it (a BOS): they take no place, nor do the
    special tokens a completion's text skips (`hidden`).

    Each entry's `top_logprobs` lists the chosen token too where it is not among the top_n, as OpenAI's
    legacy format does (up to top_n + 1 entries), so a client finds every token's own logprob there."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        top_n: int,
        start_offset: int = 0,
        spelled: str | None = None,
        hidden: Collection[int] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        # Ids the text leaves out (special tokens of a completion decoded with skip_special_tokens).
        self._hidden = hidden
        self._top_n = top_n
        self._offset = start_offset
        # Bytes of a character begun by the tokens so far and not yet complete (it starts at _offset).
        self._partial = b""
        # The text the tokens spell, where it is known.
        self._spelled = spelled

    def add(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None]) -> CompletionLogprobs:
        """The logprobs of these new tokens alone (a streaming chunk's worth); None for a token that has
        none (a prompt's first)."""
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            text = self._tokenizer.token_to_text(token_id)
            result.tokens.append(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                logprob = _finite(entry.logprob)
                result.token_logprobs.append(logprob)
                top = {
                    self._tokenizer.token_to_text(alt): _finite(lp) for alt, lp in entry.top[: self._top_n]
                }
                top.setdefault(text, logprob)
                result.top_logprobs.append(top)
            if self._in_text(token_id, text):
                token_bytes = self._spelled_bytes(_token_bytes(self._tokenizer, token_id, text))
                result.text_offset.append(self._offset + self._broken_before(token_bytes))
                self._advance(token_bytes)
            else:
                result.text_offset.append(self._offset)
        return result

    def _spelled_bytes(self, token_bytes: bytes) -> bytes:
        """The bytes the token takes in the spelled text: a SentencePiece tokenizer's encoding puts a
        space before the text's first word (its dummy prefix) that the text itself does not hold."""
        if (
            self._spelled is None
            or self._partial
            or not token_bytes.startswith(b" ")
            or self._spelled.startswith(" ", self._offset)
        ):
            return token_bytes
        return token_bytes[1:]

    def _broken_before(self, token_bytes: bytes) -> int:
        """The characters (U+FFFD) that the pending bytes become when this token's first byte cannot
        continue them: the token's text then starts after them, not where they began."""
        if not self._partial or not token_bytes:
            return 0
        try:
            codecs.getincrementaldecoder("utf-8")().decode(self._partial + token_bytes[:1])
        except UnicodeDecodeError:
            return len(self._partial.decode("utf-8", errors="replace"))
        return 0

    def _in_text(self, token_id: int, text: str) -> bool:
        """Whether the token takes its place in the text: all but a hidden one and an added token that
        the spelled text does not hold where the token stands."""
        if token_id in self._hidden:
            return False
        if self._spelled is None or self._tokenizer.added_tokens.get(text) != token_id:
            return True
        return self._spelled.startswith(text, self._offset)

    def _advance(self, token_bytes: bytes) -> None:
        """Move the offset past the characters these bytes complete (bytes that can never be one count
        as the U+FFFD the text shows for them)."""
        data = self._partial + token_bytes
        end = complete_utf8_end(data)
        self._partial = data[end:]
        self._offset += len(data[:end].decode("utf-8", errors="replace"))


def joined(first: CompletionLogprobs, second: CompletionLogprobs | None) -> CompletionLogprobs:
    """One choice's logprobs, `first`'s tokens then `second`'s (an echoed prompt's, then the completion's)."""
    if second is None:
        return first
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def prompt_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None], top_n: int
) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: per prompt token, by token id, the token itself (with its rank) first,
    then its `top_n` most likely alternatives (ranks 1 to top_n); None where a token has none."""
    result: PromptLogprobs = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            result.append(None)
            continue
        position = {token_id: _prompt_logprob(tokenizer, token_id, entry.logprob, entry.rank)}
        for rank, (alt_id, logprob) in enumerate(entry.top[:top_n], start=1):
            position.setdefault(alt_id, _prompt_logprob(tokenizer, alt_id, logprob, rank))
        result.append(position)
    return result


def _prompt_logprob(tokenizer: Tokenizer, token_id: int, logprob: float, rank: int) -> PromptLogprob:
    return PromptLogprob(logprob=_finite(logprob), rank=rank, decoded_token=tokenizer.token_to_text(token_id))
