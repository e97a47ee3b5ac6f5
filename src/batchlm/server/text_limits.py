"""Rejects a text that cannot fit the context by its length alone, before any tokenization.

Tokenizing costs time in proportion to the characters: a message of megabytes is seconds of CPU,
which only to learn that it is far too long. A tokenizer whose tokens stand for at most L characters each (`max_chars_per_token`)
needs more than max_model_len tokens for any text over max_model_len x L characters, so such a text is
refused at once. The bound is sound by construction (tokenizer/text_bound.py): it never refuses a
text that could fit. Tokenizers without a known bound skip this check; their long texts are still
tokenized off the event loop."""

from __future__ import annotations

from typing import Any

from batchlm.server.errors import APIError


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int | None:
    """The longest text (in characters) that could still fit `max_model_len` tokens; None if unknown."""
    per_token: int | None = getattr(tokenizer, "max_chars_per_token", None)
    return None if per_token is None else max_model_len * per_token


def reject_text_over_context(tokenizer: Any, chars: int, max_model_len: int, param: str) -> None:
    """400 (context_length_exceeded) when `chars` characters cannot fit the context."""
    limit = max_prompt_chars(tokenizer, max_model_len)
    if limit is not None and chars > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your {param} is "
            f"{chars} characters long, more than {max_model_len} tokens can hold (at most {limit} "
            f"characters for this tokenizer). Please reduce the length of the {param}.",
            param=param,
            code="context_length_exceeded",
        )
