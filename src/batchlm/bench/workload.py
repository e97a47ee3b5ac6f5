"""Builds the list of requests a run sends: prompts, max_tokens and think times, reproducible from a seed."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchlm.bench.datasets import (
    PromptSample,
    builtin_samples,
    grounded_samples,
    load_jsonl,
    load_sharegpt,
    random_samples,
)
from batchlm.bench.fitting import fit_repeated_prompts, prompt_token_budget
from batchlm.bench.records import RequestSpec
from batchlm.bench.tokencount import TokenCounter
from batchlm.bench.words import BUILTIN_PROMPTS


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send; every field comes from a CLI flag of the same name."""

    # "builtin", "random", "jsonl" or "sharegpt".
    dataset_name: str
    # File for "jsonl" and "sharegpt".
    dataset_path: str | None
    # Requests to build.
    num_requests: int
    # Prompt tokens of "random" prompts.
    input_len: int | None
    # Fixed max_tokens for every request (overrides dataset lengths and the min/max range).
    output_len: int | None
    # Range max_tokens is drawn from, uniformly, when neither --output-len nor the dataset sets it.
    min_tokens: int
    max_tokens: int
    # Range of the closed-loop users' think time before each request, seconds.
    min_delay: float
    max_delay: float
    # Seeds prompt choice, max_tokens, think times (and, elsewhere, arrival times).
    seed: int
    # How many times each built-in prompt is repeated.
    prompt_repeat: int


@dataclass(frozen=True)
class Workload:
    """The requests of a run, and how their prompt lengths are known."""

    specs: list[RequestSpec]
    # e.g. "tokenize endpoint", "usage calibration", "not measured (server usage only)".
    prompt_length_method: str
    # The served model's context the built-in prompts were cut to fit, when some had to be.
    fitted_to_context: int | None = None


async def build_workload(
    config: WorkloadConfig,
    get_counter: Callable[[], Awaitable[TokenCounter]],
    max_model_len: int | None = None,
) -> Workload:
    """Builds `num_requests` specs; `get_counter` is awaited only when prompt lengths must be counted.
    With the served model's `max_model_len`, built-in prompts are cut to fit it with their max_tokens."""
    method = "not measured here (from the server's usage)"
    prompt_rng = random.Random(f"{config.seed}:prompts")
    fitted_to = None
    if config.dataset_name == "random":
        if config.input_len is None:
            raise ValueError("the random dataset needs --input-len")
        counter = await get_counter()
        samples = await random_samples(config.num_requests, config.input_len, counter, prompt_rng)
        method = counter.method
        chosen = samples
    else:
        pool = _load_pool(config)
        if config.dataset_name == "builtin" and max_model_len is not None:
            fitted = await _fit_builtin(config, max_model_len, get_counter)
            fitted_to = max_model_len if fitted != pool else None
            pool = fitted
        chosen = _choose(
            pool, config.num_requests, prompt_rng, with_replacement=config.dataset_name == "builtin"
        )
    return Workload(_assign_lengths_and_delays(chosen, config), method, fitted_to)


async def _fit_builtin(
    config: WorkloadConfig, max_model_len: int, get_counter: Callable[[], Awaitable[TokenCounter]]
) -> list[PromptSample]:
    budget = prompt_token_budget(max_model_len, config.output_len or config.max_tokens)
    return await fit_repeated_prompts(BUILTIN_PROMPTS, config.prompt_repeat, budget, await get_counter())


def _load_pool(config: WorkloadConfig) -> list[PromptSample]:
    if config.dataset_name == "builtin":
        return builtin_samples(config.prompt_repeat)
    if config.dataset_name in ("editing", "summarization"):
        return grounded_samples(config.dataset_name)
    if config.dataset_path is None:
        raise ValueError(f"the {config.dataset_name} dataset needs --dataset-path")
    if config.dataset_name == "jsonl":
        return load_jsonl(config.dataset_path)
    if config.dataset_name == "sharegpt":
        return load_sharegpt(config.dataset_path)
    raise ValueError(f"unknown dataset {config.dataset_name!r}")


def _choose(
    pool: list[PromptSample], count: int, rng: random.Random, with_replacement: bool
) -> list[PromptSample]:
    """Built-in prompts are drawn independently (as the seed's users did); file prompts are shuffled and
    taken in order, wrapping around (with a fresh shuffle) when the file is shorter than the run."""
    if with_replacement:
        return [rng.choice(pool) for _ in range(count)]
    chosen: list[PromptSample] = []
    while len(chosen) < count:
        order = list(pool)
        rng.shuffle(order)
        chosen.extend(order[: count - len(chosen)])
    return chosen


def _assign_lengths_and_delays(samples: list[PromptSample], config: WorkloadConfig) -> list[RequestSpec]:
    length_rng = random.Random(f"{config.seed}:max_tokens")
    delay_rng = random.Random(f"{config.seed}:think")
    specs = []
    for sample in samples:
        drawn = length_rng.randint(config.min_tokens, config.max_tokens)
        max_tokens = config.output_len or sample.output_len or drawn
        think = delay_rng.uniform(config.min_delay, config.max_delay)
        specs.append(RequestSpec(sample.prompt, max_tokens, prompt_len=sample.prompt_len, think_time=think))
    return specs
