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

from batchlm.sampling_params import SamplingParams
from batchlm.tools.call_grammar import BLANK, free_text, token_rule
from batchlm.tools.scan import partial_marker_length


@dataclass(frozen=True)
class ThinkMarkers:
    start: str
    end: str
    # The markers are special tokens (Mistral's control tokens), which the detokenizer must keep.
    special: bool = False


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
    return prompt_tail.rstrip().endswith(markers.start)


class ReasoningParser:
    def __init__(self, markers: ThinkMarkers, opened_by_prompt: bool = False) -> None:
        self.markers = markers
        self.opened_by_prompt = opened_by_prompt

    def split(self, text: str, final: bool) -> ReasoningSplit:
        """The thinking and the answer of `text`, as far as they are settled (all of it when `final`):
        text that may still turn out to be a marker is held back."""
        end = self.markers.end
        body_at = self._body_at(text)
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
        if self._body_at(decode(token_ids)) is None:
            return 0
        low, high = 0, len(token_ids)  # the block is open after `low` tokens; closed or ended at `high`
        while high - low > 1:
            middle = (low + high) // 2
            if self._closed(decode(token_ids[:middle])):
                high = middle
            else:
                low = middle
        return high

    def _body_at(self, text: str) -> int | None:
        """Where the thinking begins in `text`: at once when the prompt opened the block, after the
        output's start marker, or None when the output does not open with one."""
        if self.opened_by_prompt:
            return 0
        opening = text.lstrip()
        if not opening.startswith(self.markers.start):
            return None
        return len(text) - len(opening) + len(self.markers.start)

    def _closed(self, text: str) -> bool:
        body_at = self._body_at(text)
        return body_at is not None and text.find(self.markers.end, body_at) >= 0

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def sampling_params(self, params: SamplingParams, added_tokens: Mapping[str, int]) -> SamplingParams:
        """params with their constraint (if any) holding from the end of the thinking block on: the model
        thinks freely first (a JSON constraint from the first token would leave it no room to), as
        vLLM's reasoning parsers do; special markers kept in the text."""
        if self.markers.special:
            params = params.clone(skip_special_tokens=False)
        constraint = params.structured_outputs
        if constraint is None:
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


class ReasoningStream:
    """Fed an output's text deltas; answers the thinking and the answer text each one settles."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._parser = parser
        self._text = ""
        self._reasoning_sent = 0
        self._content_sent = 0

    def feed(self, delta: str) -> ReasoningDelta:
        self._text += delta
        return self._difference(self._parser.split(self._text, final=False))

    def finish(self) -> ReasoningDelta:
        return self._difference(self._parser.split(self._text, final=True))

    def _difference(self, split: ReasoningSplit) -> ReasoningDelta:
        reasoning = split.reasoning or ""
        delta = ReasoningDelta(reasoning[self._reasoning_sent :], split.content[self._content_sent :])
        self._reasoning_sent = max(self._reasoning_sent, len(reasoning))
        self._content_sent = max(self._content_sent, len(split.content))
        return delta
