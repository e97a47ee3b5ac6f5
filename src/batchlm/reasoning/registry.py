"""Reasoning parsers by name (`--reasoning-parser`), and the choice `auto` makes from the chat template."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from batchlm.reasoning.harmony import HARMONY, HarmonyReasoningParser
from batchlm.reasoning.split import ReasoningParser, ThinkMarkers, prompt_opens_thinking
from batchlm.tools.call_grammar import decoding_hides
from batchlm.tools.harmony import HARMONY_EFFORTS, is_harmony_template

THINK = ThinkMarkers("<think>", "</think>")
MISTRAL_THINK = ThinkMarkers("[THINK]", "[/THINK]", special=True)
# Added tokens of Seed-OSS's tokenizer, kept in the text where it would hide them (reasoning_parser).
# Under a thinking budget of 0 its template opens the block and a budget reflection in it.
SEED_THINK = ThinkMarkers("<seed:think>", "</seed:think>", prompt_tags=("<seed:cot_budget_reflect>",))
# vLLM's names for the <think> families are accepted beside ours, so its command lines carry over.
MARKERS: dict[str, ThinkMarkers] = {
    "think": THINK,
    "qwen3": THINK,
    "deepseek_r1": THINK,
    "mistral": MISTRAL_THINK,
    "seed_oss": SEED_THINK,
    "gpt_oss": HARMONY,
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
    if is_harmony_template(template):
        return HARMONY
    # No marker holds another (`</seed:think>` holds no `</think>`); Seed's, the more specific, first.
    return next((m for m in (SEED_THINK, THINK, MISTRAL_THINK) if m.end in template), None)


def reasoning_parser(
    setting: str,
    chat_template: str | None,
    prompt_tail: Callable[[], str],
    continued: str | None = None,
    added_tokens: Mapping[str, int] | None = None,
    hidden_ids: Callable[[], Collection[int]] = frozenset,
) -> ReasoningParser | None:
    """The reasoning parser of one chat request; prompt_tail gives the text of the prompt's last tokens
    (special tokens kept), read only where the setting names markers; continued: the text of the final
    assistant message, when the request continues it (continue_final_message). added_tokens: the
    tokenizer's added tokens by text; hidden_ids gives the ids a text decoded without special tokens
    leaves out, read only where a marker is an added token: the text keeps special tokens where it
    would hide a marker."""
    markers = reasoning_markers(setting, chat_template)
    if markers is None:
        return None
    if markers is HARMONY:
        return HarmonyReasoningParser()
    opened = prompt_opens_thinking(prompt_tail(), markers, continued)
    return ReasoningParser(markers, opened, _hidden(markers, added_tokens or {}, hidden_ids))


def _hidden(
    markers: ThinkMarkers, added_tokens: Mapping[str, int], hidden_ids: Callable[[], Collection[int]]
) -> bool:
    """Whether a text decoded without special tokens would leave a marker out (hidden_ids read only
    where a marker is an added token)."""
    pair = (markers.start, markers.end)
    return any(marker in added_tokens for marker in pair) and decoding_hides(pair, added_tokens, hidden_ids())


# The chat-template variable by which Qwen3's and SmolLM3's templates turn thinking on or off.
THINKING_SWITCH = "enable_thinking"
# What turns thinking off, by the template variable that does it: Qwen3's and SmolLM3's switch, and
# Seed-OSS's thinking budget (0: a short reflection in place of thinking).
THINKING_OFF = {THINKING_SWITCH: False, "thinking_budget": 0}


def effort_template_kwargs(
    effort: str, chat_template: str | None, template_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The chat template's variables for a request's `reasoning_effort`: the effort itself as
    `reasoning_effort` (the name gpt-oss's templates read), and for "none" thinking switched off where
    the template has a variable for it (THINKING_OFF), unless the client's chat_template_kwargs set it.
    A harmony template (gpt-oss's) knows low, medium and high only (HARMONY_EFFORTS)."""
    if is_harmony_template(chat_template):
        effort = HARMONY_EFFORTS.get(effort, effort)
    kwargs = {"reasoning_effort": effort, **(template_kwargs or {})}
    if effort == "none":
        for variable, off in THINKING_OFF.items():
            if variable in (chat_template or ""):
                kwargs.setdefault(variable, off)
    return kwargs
