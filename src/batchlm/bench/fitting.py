"""Fitting the built-in prompts to the served model's context: each prompt, repeated --prompt-repeat
times, is cut to the most repeats that leave room for the longest answer the run may ask for."""

from __future__ import annotations

from collections.abc import Sequence

from batchlm.bench.datasets import PromptSample
from batchlm.bench.tokencount import TokenCounter

# Tokens kept free for what a chat template wraps around a prompt (role markers, a default system
# prompt): the token counter counts the prompt text alone.
TEMPLATE_RESERVE_TOKENS = 64


def prompt_token_budget(max_model_len: int, max_output_tokens: int) -> int:
    """The prompt tokens that leave room for `max_output_tokens` in a `max_model_len` context; a
    ValueError says what to change when there is no room at all."""
    budget = max_model_len - max_output_tokens - TEMPLATE_RESERVE_TOKENS
    if budget < 1:
        raise ValueError(
            f"the served model's context is {max_model_len} tokens, which leaves no room for a prompt "
            f"with up to {max_output_tokens} output tokens; lower --max-tokens (or --output-len)"
        )
    return budget


async def fit_repeated_prompts(
    prompts: Sequence[str], repeat: int, budget: int, counter: TokenCounter
) -> list[PromptSample]:
    """Each prompt repeated as often as fits in `budget` tokens, `repeat` times at most."""
    return [PromptSample(await _longest_repeat(prompt, repeat, budget, counter)) for prompt in prompts]


async def _longest_repeat(prompt: str, repeat: int, budget: int, counter: TokenCounter) -> str:
    def repeated(times: int) -> str:
        return " ".join([prompt] * times)

    if await counter.count(repeated(repeat)) <= budget:
        return repeated(repeat)
    # Binary search: `fits` repeats fit, `too_many` do not (token counts grow with the repeats).
    fits, too_many = 0, repeat
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if await counter.count(repeated(middle)) <= budget:
            fits = middle
        else:
            too_many = middle
    if fits == 0:
        raise ValueError(
            f"the built-in prompt {prompt[:40]!r} alone exceeds the {budget}-token prompt budget"
        )
    return repeated(fits)
