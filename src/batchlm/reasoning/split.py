"""A reasoning model's output as its thinking (`reasoning_content`) and its answer (`content`).

The thinking is the text between the family's markers, the answer what follows the end marker. Either
the output opens the block with the start marker, or the prompt already did (DeepSeek-R1's template
ends its generation prompt with `<think>`); an output that does neither is all answer. As with tool
calls, a stream sends the difference between two splits of the output so far, and what a split
reports only ever grows as the output grows, so the pieces add up to the split of the whole."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from batchlm.sampling_params import SamplingParams
from batchlm.tools.call_grammar import BLANK, free_text, token_rule
from batchlm.tools.scan import partial_marker_length


@dataclass(frozen=True)
class ThinkMarkers:
    start: str
    end: str
    # The markers are special tokens (Mistral's control tokens), which the detokenizer must keep.
    special: bool = False
    # Tags a generation prompt may open right after the start marker, leaving the model inside both
    # (Seed-OSS's budget reflection, which its template opens under a thinking budget of 0).
    prompt_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReasoningSplit:
    # The thinking, stripped of surrounding whitespace; None when the output has no thinking block.
    reasoning: str | None
    content: str


def prompt_opens_thinking(prompt_tail: str, markers: ThinkMarkers, continued: str | None = None) -> bool:
    """Whether a prompt ending in `prompt_tail` (its last few tokens' text, special tokens kept) leaves
    the model inside a thinking block: as DeepSeek-R1's generation prompt does, or as the assistant
    message a request continues (`continued`, its text, which ends the prompt) does when it opens a
    block it does not close (a client writing the start of the thinking for the model)."""
    if continued is not None and continued.rfind(markers.start) > continued.rfind(markers.end):
        return True
    tail = prompt_tail.rstrip()
    return any(tail.endswith(markers.start + tag) for tag in ("", *markers.prompt_tags))


class ReasoningParser:
    def __init__(
        self, markers: ThinkMarkers, opened_by_prompt: bool = False, keeps_special_tokens: bool = False
    ) -> None:
        """keeps_special_tokens: the detokenizer keeps special tokens in the text, as it must where the
        tokenizer would hide the markers (always for `special` ones)."""
        self.markers = markers
        self.opened_by_prompt = opened_by_prompt
        self.keeps_special_tokens = markers.special or keeps_special_tokens

    def split(self, text: str, final: bool) -> ReasoningSplit:
        """The thinking and the answer of `text`, as far as they are settled (all of it when `final`):
        text that may still turn out to be a marker is held back."""
        end = self.markers.end
        body_at = self.thinking_at(text)
        if body_at is None:
            if not final and self.markers.start.startswith(text.lstrip()):
                return ReasoningSplit(None, "")
            return ReasoningSplit(None, text)
        end_at = text.find(end, body_at)
        if end_at < 0:
            body = text[body_at:]
            if not final:
                body = body[: len(body) - partial_marker_length(body, (end,))]
            return ReasoningSplit(body.strip(), "")
        # The answer's leading blank lines belong to the template's layout, not to the answer.
        return ReasoningSplit(text[body_at:end_at].strip(), text[end_at + len(end) :].lstrip())

    def thinking_tokens(self, token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> int:
        """How many of an output's tokens its thinking took, end marker included (usage's
        `reasoning_tokens`): the shortest prefix whose text closes the block, found by halving, since
        a prefix that closes it stays closed as tokens are added; all of them when it never closes,
        none for an output without thinking."""
        if self.thinking_at(decode(token_ids)) is None:
            return 0
        low, high = 0, len(token_ids)  # the block is open after `low` tokens; closed or ended at `high`
        while high - low > 1:
            middle = (low + high) // 2
            if self._closed(decode(token_ids[:middle])):
                high = middle
            else:
                low = middle
        return high

    def thinking_at(self, text: str) -> int | None:
        """Where the thinking begins in `text`: at once when the prompt opened the block, after the
        output's start marker, or None when the output does not open with one."""
        if self.opened_by_prompt:
            return 0
        opening = text.lstrip()
        if not opening.startswith(self.markers.start):
            return None
        return len(text) - len(opening) + len(self.markers.start)

    def _closed(self, text: str) -> bool:
        body_at = self.thinking_at(text)
        return body_at is not None and text.find(self.markers.end, body_at) >= 0

    def stream(self) -> ThinkingStream:
        return ReasoningStream(self)

    def sampling_params(
        self, params: SamplingParams, added_tokens: Mapping[str, int], thinking_held: bool = False
    ) -> SamplingParams:
        """params with their constraint (if any) holding from the end of the thinking block on: the model
        thinks freely first (a JSON constraint from the first token would leave it no room to), as
        vLLM's reasoning parsers do; special markers kept in the text. thinking_held: the constraint
        holds the thinking itself (a tool-call grammar of the whole output, gpt-oss's): it stays as is."""
        if self.keeps_special_tokens:
            params = params.clone(skip_special_tokens=False)
        constraint = params.structured_outputs
        if constraint is None or thinking_held:
            return params
        return params.clone(structured_outputs=replace(constraint, preamble=self._preamble(added_tokens)))

    def _preamble(self, added_tokens: Mapping[str, int]) -> str:
        """Lark rules for the thinking block: between the markers (by id where they are tokens of their
        own), free text that does not spell the end marker out; optional unless the prompt opened it."""
        start, end = self.markers.start, self.markers.end
        start_rule = token_rule(start, added_tokens) or json.dumps(start)
        end_rule = token_rule(end, added_tokens) or json.dumps(end)
        block = (
            f"free {end_rule} BLANK" if self.opened_by_prompt else f"({start_rule} free {end_rule} BLANK)?"
        )
        return "\n".join([f"preamble: {block}", *free_text(added_tokens, (end, start)), BLANK])


@dataclass(frozen=True)
class ReasoningDelta:
    reasoning: str
    content: str


class ThinkingStream(Protocol):
    """Fed an output's text deltas; answers the thinking and the answer text each one settles."""

    def feed(self, delta: str) -> ReasoningDelta: ...

    def finish(self) -> ReasoningDelta: ...


class ReasoningStream:
    """Fed an output's text deltas; answers the thinking and the answer text each one settles.

    What it sends is the difference between splits of the output so far (`ReasoningParser.split`), but
    once the output's start is settled a delta is read alone: where the thinking begins and ends is
    fixed by then, so only the text a delta adds (and the end of the thinking it may release) is looked
    at, and a long thinking block costs the same a delta however long it grows."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._parser = parser
        self._text = ""
        self._reasoning_sent = 0
        self._content_sent = 0
        # Where the thinking begins, once the output's start shows it (None: no block, or not known yet).
        self._body_at: int | None = None
        # Where the answer begins (just past the end marker, or 0 for an output that opens no block),
        # once that is known.
        self._answer_at: int | None = None
        # The first non-blank character of the thinking, and of the answer: where what is sent begins.
        self._thinking_from: int | None = None
        self._answer_from: int | None = None
        # The blanks past the end marker read so far, while the answer has not begun.
        self._blank_to = 0
        # The thinking read so far: the end marker cannot begin before _searched; text before _settled
        # can no longer turn out to be the marker; the thinking sent ends at _last (blanks held back).
        self._searched = 0
        self._settled = 0
        self._last = 0

    def feed(self, delta: str) -> ReasoningDelta:
        text = self._text
        self._text = ""  # the only reference left is `text`: the += below extends it in place
        text += delta
        self._text = text
        if self._answer_at is not None:
            return self._content(self._answer_at)
        if self._body_at is None:
            self._body_at = self._parser.thinking_at(text)
            if self._body_at is None:
                if not self._parser.markers.start.startswith(text.lstrip()):
                    # All answer, as it stands: the output's start can no longer become the marker.
                    self._answer_at = self._answer_from = 0
                return self._difference(self._parser.split(text, final=False))
            self._searched = self._settled = self._last = self._body_at
        return self._thinking()

    def finish(self) -> ReasoningDelta:
        return self._difference(self._parser.split(self._text, final=True))

    def _thinking(self) -> ReasoningDelta:
        """A delta inside the thinking: its end marker searched for in the new text only."""
        text, end, body_at = self._text, self._parser.markers.end, self._body_at
        assert body_at is not None
        end_at = text.find(end, self._searched)
        if end_at >= 0:
            # The block closed: split once more (the answer's start is settled from here on).
            self._answer_at = end_at + len(end)
            return self._difference(self._parser.split(text, final=False))
        self._searched = max(body_at, len(text) - len(end) + 1)
        held = partial_marker_length(text[self._searched :], (end,))
        settled, self._settled = self._settled, len(text) - held
        new = text[settled : self._settled]
        body = new.rstrip()
        if body:  # text that is not blank: the thinking sent runs to its end
            if self._thinking_from is None:
                self._thinking_from = settled + len(new) - len(new.lstrip())
            self._last = settled + len(body)
        if self._thinking_from is None:
            return ReasoningDelta("", "")
        piece = text[self._thinking_from + self._reasoning_sent : self._last]
        self._reasoning_sent += len(piece)
        return ReasoningDelta(piece, "")

    def _content(self, start: int) -> ReasoningDelta:
        """A delta of the answer, which begins at its first non-blank character past `start` (the end
        marker's end; an output that is all answer begins at once)."""
        text = self._text
        if self._answer_from is None:
            # Blanks before the answer are skipped once each: the search goes on where it stopped.
            rest = text[max(start, self._blank_to) :].lstrip()
            if not rest:
                self._blank_to = len(text)
                return ReasoningDelta("", "")
            self._answer_from = len(text) - len(rest)
        piece = text[self._answer_from + self._content_sent :]
        self._content_sent += len(piece)
        return ReasoningDelta("", piece)

    def _difference(self, split: ReasoningSplit) -> ReasoningDelta:
        reasoning = split.reasoning or ""
        delta = ReasoningDelta(reasoning[self._reasoning_sent :], split.content[self._content_sent :])
        self._reasoning_sent = max(self._reasoning_sent, len(reasoning))
        self._content_sent = max(self._content_sent, len(split.content))
        return delta
