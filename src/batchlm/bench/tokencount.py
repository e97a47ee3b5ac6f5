"""Counting prompt tokens without a local tokenizer: the server's /tokenize, or a usage-fitted estimate."""

from __future__ import annotations

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
    """POST {root}/tokenize {"prompt": text} -> {"count": n} (batchlm and vLLM both serve this)."""

    method = "tokenize endpoint"
    exact = True

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self._session = session
        self._url = url
        self._headers = headers

    async def count(self, text: str) -> int:
        body = json.dumps({"prompt": text}).encode()
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
    endpoint_counter = TokenizeEndpointCounter(session, tokenize_url, endpoint.headers)
    try:
        await endpoint_counter.count("hello world")
        return endpoint_counter
    except (TokenCountError, aiohttp.ClientError, OSError, ValueError) as exc:
        endpoint_problem = str(exc) or type(exc).__name__
    try:
        return UsageFitCounter(await _fit_tokens_per_word(session, endpoint))
    except TokenCountError as exc:
        raise TokenCountError(
            f"cannot count prompt tokens: {tokenize_url} failed ({endpoint_problem}) and {exc}"
        ) from None


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
