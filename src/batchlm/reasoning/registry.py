"""Reasoning parsers by name (`--reasoning-parser`), and the choice `auto` makes from the chat template."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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
    setting: str, chat_template: str | None, prompt_tail: Callable[[], str], continued: str | None = None
) -> ReasoningParser | None:
    """The reasoning parser of one chat request; prompt_tail gives the text of the prompt's last tokens
    (special tokens kept), read only where the setting names markers; continued: the text of the final
    assistant message, when the request continues it (continue_final_message)."""
    markers = reasoning_markers(setting, chat_template)
    if markers is None:
        return None
    return ReasoningParser(markers, prompt_opens_thinking(prompt_tail(), markers, continued))


# The chat-template variable by which Qwen3's and SmolLM3's templates turn thinking on or off.
THINKING_SWITCH = "enable_thinking"


def effort_template_kwargs(
    effort: str, chat_template: str | None, template_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The chat template's variables for a request's `reasoning_effort`: the effort itself as
    `reasoning_effort` (the name gpt-oss's templates read), and for "none" thinking switched off where
    the template has a switch for it, unless the client's chat_template_kwargs set the switch."""
    kwargs = {"reasoning_effort": effort, **(template_kwargs or {})}
    if effort == "none" and THINKING_SWITCH in (chat_template or ""):
        kwargs.setdefault(THINKING_SWITCH, False)
    return kwargs
