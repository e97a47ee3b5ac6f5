"""Prompt sources: built-in prompts, random prompts of a token length, a JSONL file, ShareGPT JSON."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchlm.bench.grounded_prompts import grounded_prompts
from batchlm.bench.tokencount import TokenCounter
from batchlm.bench.words import BUILTIN_PROMPTS, VOCABULARY

DATASET_NAMES = ("builtin", "random", "jsonl", "sharegpt", "editing", "summarization")
# Distinct prompts in each generated dataset (editing, summarization).
GROUNDED_POOL_SIZE = 16
# vLLM calls a JSONL file of {"prompt": ...} lines the "custom" dataset.
DATASET_ALIASES = {"custom": "jsonl"}
# Rough English tokens per whitespace word, used only where the server cannot count for us.
TOKENS_PER_WORD_GUESS = 1.3
# Token-count requests allowed per random prompt while searching for the exact length.
_LENGTH_FIT_ROUNDS = 24


class DatasetError(ValueError):
    """A prompt file that cannot be used, with the file and line at fault."""


@dataclass(frozen=True)
class PromptSample:
    """One prompt of a dataset, before max_tokens and timing are chosen."""

    prompt: str
    # Prompt tokens when known (random prompts, counted by the server).
    prompt_len: int | None = None
    # Output length the dataset asks for (JSONL "max_tokens"/"output_len", ShareGPT reply length).
    output_len: int | None = None


def builtin_samples(repeat: int) -> list[PromptSample]:
    """The built-in prompts, each repeated `repeat` times (the seed made long prompts this way)."""
    return [PromptSample(" ".join([prompt] * repeat)) for prompt in BUILTIN_PROMPTS]


def grounded_samples(kind: str) -> list[PromptSample]:
    """The generated input-grounded prompts: "editing" (rewrite code with a name changed) or
    "summarization" (summarize an article); the same prompts on every run."""
    return [PromptSample(prompt) for prompt in grounded_prompts(kind, GROUNDED_POOL_SIZE)]


def load_jsonl(path: str) -> list[PromptSample]:
    """One JSON value per line: a string, or an object with "prompt" and optionally
    "max_tokens" / "output_len" / "output_tokens"."""
    samples: list[PromptSample] = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc})") from None
        samples.append(_jsonl_sample(record, where))
    if not samples:
        raise DatasetError(f"{path}: no prompts found")
    return samples


def _jsonl_sample(record: Any, where: str) -> PromptSample:
    if isinstance(record, str):
        return PromptSample(record)
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DatasetError(f'{where}: expected a string or an object with a string "prompt"')
    output_len = next((record[k] for k in ("max_tokens", "output_len", "output_tokens") if k in record), None)
    if output_len is not None and (not isinstance(output_len, int) or output_len < 1):
        raise DatasetError(f"{where}: the output length must be a positive integer, got {output_len!r}")
    return PromptSample(record["prompt"], output_len=output_len)


def load_sharegpt(path: str) -> list[PromptSample]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}; the first human turn is the prompt and the reply's length
    (estimated from its words, see `estimate_tokens`) is the output length."""
    try:
        records = json.loads(_read_text(path))
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path}: expected a JSON list of conversations")
    samples = [sample for record in records if (sample := _sharegpt_sample(record)) is not None]
    if not samples:
        raise DatasetError(f"{path}: no conversation starts with a human turn followed by a reply")
    return samples


def _sharegpt_sample(record: Any) -> PromptSample | None:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, reply = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(reply, dict)):
        return None
    if first.get("from") not in ("human", "user") or not first.get("value") or not reply.get("value"):
        return None
    return PromptSample(str(first["value"]), output_len=estimate_tokens(str(reply["value"])))


def estimate_tokens(text: str) -> int:
    """Token estimate from whitespace words; only for lengths the server cannot tell us."""
    return max(1, round(len(text.split()) * TOKENS_PER_WORD_GUESS))


async def random_samples(
    count: int, input_len: int, counter: TokenCounter, rng: random.Random, parallel: int = 8
) -> list[PromptSample]:
    """`count` prompts of random vocabulary words, each `input_len` tokens long as the server counts
    (exact with a /tokenize endpoint wherever some prefix of the text has that count; within a few
    tokens with a usage-fitted counter)."""
    sample_text = " ".join(VOCABULARY)
    chars_per_token = len(sample_text) / max(1, await counter.count(sample_text))
    # Twice as many words as tokens: any tokenizer needs fewer tokens than that, so a prefix fits.
    texts = [" ".join(rng.choices(VOCABULARY, k=input_len * 2 + 8)) for _ in range(count)]
    limit = asyncio.Semaphore(parallel)

    async def fit(text: str) -> PromptSample:
        async with limit:
            return await _fit_length(text, input_len, chars_per_token, counter)

    return list(await asyncio.gather(*(fit(text) for text in texts)))


async def _fit_length(text: str, target: int, chars_per_token: float, counter: TokenCounter) -> PromptSample:
    """The prefix of `text` whose token count is `target` (or the closest one seen).

    Token counts grow with the prefix length, so this brackets the cut point: each round guesses from
    the measured error (secant step) and falls back to bisection when the guess leaves the bracket.
    """
    low, high = 0, len(text) + 1  # count(text[:low]) < target < count(text[:high]), as far as known
    cut = min(len(text), max(1, round(target * chars_per_token)))
    best_cut, best_count = cut, -1
    for _ in range(_LENGTH_FIT_ROUNDS):
        counted = await counter.count(text[:cut])
        if best_count < 0 or abs(counted - target) < abs(best_count - target):
            best_cut, best_count = cut, counted
        if counted == target:
            break
        low, high = (cut, high) if counted < target else (low, cut)
        if high - low <= 1:
            break
        guess = cut + round((target - counted) * chars_per_token)
        cut = guess if low < guess < high and guess <= len(text) else (low + min(high, len(text))) // 2
        if cut in (low, high):
            break
    return PromptSample(text[:best_cut], prompt_len=best_count)


def _read_text(path: str) -> str:
    try:
        # utf-8-sig: a file saved with a byte-order mark (as some Windows editors write) reads the same.
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"cannot read dataset file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
