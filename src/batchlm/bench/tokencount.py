"""Counting prompt tokens without a local tokenizer: the server's /tokenize, or a usage-fitted estimate."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from abc import ABC, abstractmethod

import aiohttp

from batchlm.bench.client import send_request
from batchlm.bench.openai_format import EndpointConfig
from batchlm.bench.records import RequestResult, RequestSpec
from batchlm.bench.words import VOCABULARY

# Word counts of the two probe prompts used to fit tokens-per-word from usage.prompt_tokens.
_PROBE_WORDS = (16, 272)
# The text a /tokenize endpoint must count (as more than 0 tokens) before it is trusted.
_PROBE_TEXT = "hello world"


class TokenCountError(RuntimeError):
    """The server offers no way to count tokens."""


class TokenCounter(ABC):
    """Counts the tokens of a text as the server under test would."""

    # "tokenize endpoint" (exact) or "usage calibration" (an estimate).
    method: str = ""
    exact: bool = False

    @abstractmethod
    async def count(self, text: str) -> int: ...


class TokenizeEndpointCounter(TokenCounter):
    """POST {root}/tokenize -> {"count": n} or {"tokens": [...]}. batchlm and vLLM read the text from
    {"prompt": text}; llama.cpp's llama-server reads {"content": text} (with "add_special" for the BOS
    its usage counts) and answers {"tokens": []} to the other form, so the form is chosen by a probe."""

    method = "tokenize endpoint"
    exact = True

    # The request bodies tried, in order: vLLM/batchlm, then llama.cpp.
    FORMS: tuple[dict[str, object], ...] = ({"prompt": None}, {"content": None, "add_special": True})

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: dict[str, str],
        form: dict[str, object] | None = None,
    ) -> None:
        self._session = session
        self._url = url
        self._headers = headers
        self._form = form if form is not None else self.FORMS[0]

    def with_form(self, form: dict[str, object]) -> TokenizeEndpointCounter:
        return TokenizeEndpointCounter(self._session, self._url, self._headers, form)

    async def count(self, text: str) -> int:
        request = {key: text if value is None else value for key, value in self._form.items()}
        body = json.dumps(request).encode()
        async with self._session.post(self._url, data=body, headers=self._headers) as response:
            raw = await response.read()
            if response.status != 200:
                raise TokenCountError(f"POST {self._url} answered HTTP {response.status}: {raw[:200]!r}")
        payload = json.loads(raw)
        if isinstance(payload, dict) and isinstance(payload.get("count"), int):
            return int(payload["count"])
        if isinstance(payload, dict) and isinstance(payload.get("tokens"), list):
            return len(payload["tokens"])
        raise TokenCountError(f"POST {self._url} gave no 'count' or 'tokens': {raw[:200]!r}")


class UsageFitCounter(TokenCounter):
    """tokens ~= slope * words, fitted from usage.prompt_tokens of two probe requests; the chat template's
    fixed overhead (the intercept) is left out, so counts are of the prompt text alone."""

    method = "usage calibration"
    exact = False

    def __init__(self, tokens_per_word: float) -> None:
        self.tokens_per_word = tokens_per_word

    async def count(self, text: str) -> int:
        return max(1, round(self.tokens_per_word * len(text.split())))


async def make_counter(
    session: aiohttp.ClientSession, tokenize_url: str, endpoint: EndpointConfig
) -> TokenCounter:
    """The server's /tokenize when it answers, else a fit against usage.prompt_tokens; raises
    TokenCountError naming both failures when neither works."""
    counter, problems = await _first_counting_form(
        session, tokenize_url, endpoint.headers, TokenizeEndpointCounter.FORMS
    )
    if counter is not None:
        return counter
    endpoint_problem = "; ".join(problems)
    try:
        return UsageFitCounter(await _fit_tokens_per_word(session, endpoint))
    except TokenCountError as exc:
        raise TokenCountError(
            f"cannot count prompt tokens: {tokenize_url} failed ({endpoint_problem}) and {exc}"
        ) from None


async def _first_counting_form(
    session: aiohttp.ClientSession,
    tokenize_url: str,
    headers: dict[str, str],
    forms: tuple[dict[str, object], ...],
) -> tuple[TokenizeEndpointCounter | None, list[str]]:
    """The /tokenize counter of the first form that counts the probe text, and why the others did not."""
    base_counter = TokenizeEndpointCounter(session, tokenize_url, headers)
    problems: list[str] = []
    for form in forms:
        counter = base_counter.with_form(form)
        try:
            probe = await counter.count(_PROBE_TEXT)
        except (TokenCountError, aiohttp.ClientError, OSError, ValueError) as exc:
            problems.append(str(exc) or type(exc).__name__)
            continue
        if probe > 0:
            return counter, problems
        # A server that ignores the field tokenizes nothing: every text would count 0 tokens.
        problems.append(f"{sorted(form)} counted 0 tokens in {_PROBE_TEXT!r}")
    return None, problems


class OutputTokenCounting:
    """Counts the output of successful requests the server reported no usage for (it ignored
    stream_options.include_usage, or --no-include-usage) by its /tokenize of the generated text, so
    that a server sending several tokens a chunk is not taken for one token a chunk. The form is looked
    up once, when first needed; without /tokenize nothing is counted."""

    # The bodies that count a text as generated, without the BOS a prompt gets: vLLM's and batchlm's
    # form, then llama.cpp's (TokenizeEndpointCounter.FORMS, special tokens off).
    FORMS: tuple[dict[str, object], ...] = (
        {"prompt": None, "add_special_tokens": False},
        {"content": None, "add_special": False},
    )
    # /tokenize requests in flight at once.
    PARALLEL = 16

    def __init__(self, session: aiohttp.ClientSession, tokenize_url: str, headers: dict[str, str]) -> None:
        self._session = session
        self._url = tokenize_url
        self._headers = headers
        self._counter: TokenizeEndpointCounter | None = None
        self._looked_up = False

    async def count(self, results: list[RequestResult]) -> int:
        """Sets counted_completion_tokens where usage is missing; how many requests it counted."""
        todo = [r for r in results if r.ok and r.usage_completion_tokens is None and r.generated_text]
        if not todo:
            return 0
        if not self._looked_up:
            self._looked_up = True
            self._counter, _ = await _first_counting_form(self._session, self._url, self._headers, self.FORMS)
        counter = self._counter
        if counter is None:
            return 0
        limit = asyncio.Semaphore(self.PARALLEL)

        async def one(result: RequestResult) -> bool:
            async with limit:
                try:
                    result.counted_completion_tokens = await counter.count(result.generated_text or "")
                except (TokenCountError, aiohttp.ClientError, OSError, ValueError):
                    return False  # this one stays counted by its chunks
            return True

        return sum(await asyncio.gather(*(one(result) for result in todo)))


async def _fit_tokens_per_word(session: aiohttp.ClientSession, endpoint: EndpointConfig) -> float:
    probe_endpoint = dataclasses.replace(endpoint, stream=False, ignore_eos=False, keep_text=False)
    counts = []
    for words in _PROBE_WORDS:
        result = RequestResult(index=-1, spec=RequestSpec(prompt=_probe_text(words), max_tokens=1))
        await send_request(session, probe_endpoint, result)
        if result.usage_prompt_tokens is None:
            reason = result.error or "the response had no usage.prompt_tokens"
            raise TokenCountError(f"usage calibration failed ({reason})")
        counts.append(result.usage_prompt_tokens)
    slope = (counts[1] - counts[0]) / (_PROBE_WORDS[1] - _PROBE_WORDS[0])
    if slope <= 0:
        raise TokenCountError(f"usage calibration failed (prompt_tokens {counts} do not grow with length)")
    return slope


def _probe_text(words: int) -> str:
    """A prompt of `words` words drawn from the same vocabulary as random prompts, so the fit applies."""
    return " ".join(VOCABULARY[i % len(VOCABULARY)] for i in range(words))
