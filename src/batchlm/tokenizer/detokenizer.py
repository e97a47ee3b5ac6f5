"""Incremental detokenization of a token stream into UTF-8-safe text deltas, with stop strings.

Invariant: let `ids` be every id passed to `update`. Then
    "".join(all update() deltas) + finish() == tokenizer.decode(ids, skip_special_tokens)
truncated at the first completed stop string (see StopStringMatcher) that ends past the text of the
first min_tokens ids, which is excluded unless include_stop_str_in_output; nothing after it is ever
emitted. A delta never ends inside a multi-byte character (the tail that decodes to U+FFFD is held
until it completes, or until finish()), and text that could be the start of a stop string is held back
until decided.

For context-dependent tokenizers (SentencePiece drops the leading space of a sequence) the text is
decoded as a continuation of the prompt, as the model produced it: a first token '▁Paris' after the
prompt 'The capital of France is' yields ' Paris', where decode(ids) alone would give 'Paris'. For
byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, the demo model) the two are identical.

Each update costs O(new tokens). Byte-level tokenizers whose decode is the plain UTF-8 decoding of
their tokens' bytes (Tokenizer.byte_pieces) append each token's bytes and hold back only the bytes
of a character not yet complete; a U+FFFD is emitted once its bytes can no longer become a character.
Other tokenizers decode a small window of ids, from `prefix_offset` (the tokens that give the new
ones their context) up to the end, and the text of the window up to `read_offset` is what was
already emitted. (While the window's text keeps ending in U+FFFD, e.g. a model emitting invalid
bytes, the window grows until it stops doing so; finish() flushes it.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from batchlm.tokenizer.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from batchlm.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output so its first token gets its left context.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas.

    The engine front end should not feed the EOS / stop token that ended generation unless its text is
    wanted (with skip_special_tokens=True special tokens decode to nothing anyway).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        """min_tokens: a stop string must end in the text of a later token, as vLLM has it (the
        sampler holds back EOS and stop tokens as long)."""
        self._decode = tokenizer.decoder(skip_special_tokens)
        self._stop_matcher = StopStringMatcher(stop, include_stop_str_in_output)
        self._min_tokens = min_tokens
        self._num_fed = 0
        # Byte-level tokenizers: each id's bytes, appended as they come (no window decodes); the
        # bytes of a character not yet complete wait in _held_bytes.
        self._pieces_of: Mapping[int, bytes] | None = tokenizer.byte_pieces(skip_special_tokens)
        self._held_bytes = b""
        # Byte-level text does not depend on the tokens before it: the prompt context is for windows only.
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if self._pieces_of is None else []
        context_text = self._decode(context) if context else ""
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: decode the output on its own rather than emit text
            # that would complete (and so rewrite) the prompt's last character.
            context, context_text = [], ""
        # Context tokens followed by every output token.
        self._ids: list[int] = context
        # Start of the decoded window, and the first token whose text is not fully emitted.
        self.prefix_offset = 0
        self.read_offset = len(context)
        # Characters of the current window's text already emitted (or belonging to the context).
        self._window_emitted = len(context_text)
        # Emitted deltas, joined lazily (re-joining on every update would cost O(output) per token).
        self._pieces: list[str] = []
        self._finished = False
        # The stop string that ended the text, once one is matched.
        self.stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, new_token_ids: Sequence[int]) -> str:
        """Add generated ids; return the new text that is now safe to show (often "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.update() called after finish()")
        if not new_token_ids or self.stop_reason is not None:
            return ""
        early = self._min_tokens - self._num_fed  # of these ids, how many are within min_tokens
        self._num_fed += len(new_token_ids)
        if early <= 0:
            return self._update(new_token_ids, can_stop=True)
        if len(new_token_ids) <= early:
            return self._update(new_token_ids, can_stop=False)
        return self._update(new_token_ids[:early], can_stop=False) + self._update(
            new_token_ids[early:], can_stop=True
        )

    def _update(self, new_token_ids: Sequence[int], can_stop: bool) -> str:
        if self._pieces_of is not None:
            pieces = self._pieces_of
            if len(new_token_ids) == 1:  # the usual decode step: one token
                data = self._held_bytes + pieces.get(new_token_ids[0], b"")
            else:
                data = self._held_bytes + b"".join([pieces.get(i, b"") for i in new_token_ids])
            # Ending in ASCII (the usual case) there is nothing to hold, without a look at the tail.
            end = len(data) if data and data[-1] < 0x80 else complete_utf8_end(data)
            self._held_bytes = data[end:]
            text = data[:end].decode("utf-8", "replace")
            if text:
                return self._release(text, can_stop=can_stop)
            return ""
        self._ids.extend(new_token_ids)
        window = self._decode(self._ids[self.prefix_offset :])
        if window.endswith(REPLACEMENT_CHAR):
            # The last character may be incomplete: show only what precedes the replacement chars.
            stable_end = len(window.rstrip(REPLACEMENT_CHAR))
            new_text = window[self._window_emitted : stable_end]
            self._window_emitted = max(self._window_emitted, stable_end)
            return self._release(new_text, can_stop=can_stop)
        new_text = window[self._window_emitted :]
        # Everything up to here is emitted: the tokens just read become the next window's context.
        self.prefix_offset, self.read_offset = self.read_offset, len(self._ids)
        self._window_emitted = len(self._decode(self._ids[self.prefix_offset :]))
        return self._release(new_text, can_stop=can_stop)

    def finish(self) -> str:
        """Release all held-back text (never past a stop string). Further calls return ""."""
        if self._finished:
            return ""
        self._finished = True
        if self.stop_reason is not None:
            return ""
        can_stop = self._num_fed > self._min_tokens
        if self._pieces_of is not None:
            return self._release(self._held_bytes.decode("utf-8", "replace"), final=True, can_stop=can_stop)
        window = self._decode(self._ids[self.prefix_offset :])
        return self._release(window[self._window_emitted :], final=True, can_stop=can_stop)

    def _release(self, text: str, final: bool = False, can_stop: bool = True) -> str:
        released = self._stop_matcher.feed(text, final=final, can_stop=can_stop)
        self.stop_reason = self._stop_matcher.stop_reason
        if released:
            self._pieces.append(released)
        return released


def complete_utf8_end(data: bytes) -> int:
    """Where the trailing bytes that may still become a character (a lead byte followed by fewer
    continuation bytes than it announces) begin; len(data) when there are none. Decoding data[:end]
    and data[end:] separately (invalid bytes as U+FFFD) gives the same text as decoding it whole."""
    size = len(data)
    for back in range(1, min(4, size) + 1):
        byte = data[size - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for its lead
            continue
        wanted = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return size - back if wanted > back else size
    return size
