"""Reasoning parsers by name (`--reasoning-parser`), and the choice `auto` makes from the chat template."""

from __future__ import annotations

from collections.abc import Callable

from batchlm.reasoning.split import ReasoningParser, ThinkMarkers, prompt_opens_thinking

THINK = ThinkMarkers("<think>", "</think>")
MISTRAL_THINK = ThinkMarkers("[THINK]", "[/THINK]", special=True)
# vLLM's names for the <think> families are accepted beside ours, so its command lines carry over.
MARKERS: dict[str, ThinkMarkers] = {
    "think": THINK,
    "qwen3": THINK,
    "deepseek_r1": THINK,
    "mistral": MISTRAL_THINK,
}
AUTO, NO_PARSER = "auto", "none"
REASONING_PARSER_CHOICES = (AUTO, *MARKERS, NO_PARSER)


def reasoning_markers(setting: str, chat_template: str | None) -> ThinkMarkers | None:
    """The markers `--reasoning-parser` reads thinking between; None for `none`, and under `auto` for a
    template that never closes a thinking block (no reasoning model)."""
    if setting == NO_PARSER:
        return None
    if setting != AUTO:
        return MARKERS[setting]
    template = chat_template or ""
    return next((m for m in (THINK, MISTRAL_THINK) if m.end in template), None)


def reasoning_parser(
    setting: str, chat_template: str | None, prompt_tail: Callable[[], str]
) -> ReasoningParser | None:
    """The reasoning parser of one chat request; prompt_tail gives the text of the prompt's last tokens
    (special tokens kept), read only where the setting names markers."""
    markers = reasoning_markers(setting, chat_template)
    if markers is None:
        return None
    return ReasoningParser(markers, prompt_opens_thinking(prompt_tail(), markers))
