"""The HTTP side of the edge: the model name, unsupported OpenAI fields, and the mapping of OpenAI
sampling fields onto batchlm's SamplingParams; checks against the model are the input processor's."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel

from batchlm.engine.client import ServedModel
from batchlm.engine.input_processor import FieldNames
from batchlm.sampling_params import SamplingParams, SamplingParamsError
from batchlm.server.errors import APIError
from batchlm.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from batchlm.server.structured_params import structured_outputs_of

# The seed README's examples send these; they name the one served model.
PLACEHOLDER_MODEL_NAMES = ("default", "default_model")

# (field, accepted value test, why it is refused): known OpenAI fields that batchlm does not serve.
UnsupportedRule = tuple[str, Callable[[Any], bool], str]

CHAT_UNSUPPORTED: tuple[UnsupportedRule, ...] = (
    ("functions", lambda v: not v, "function calling is not supported"),
    ("function_call", lambda v: v in (None, "none"), "function calling is not supported"),
    ("audio", lambda v: v is None, "audio output is not supported"),
    ("modalities", lambda v: v in (None, ["text"]), "only the 'text' modality is supported"),
    ("prediction", lambda v: v is None, "predicted outputs are not supported"),
    ("store", lambda v: v in (None, False), "stored completions are not supported"),
    ("metadata", lambda v: not v, "metadata is only used with stored completions, which are not supported"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "there is one service tier"),
    ("reasoning_effort", lambda v: v is None, "reasoning effort is not supported"),
    ("web_search_options", lambda v: v is None, "web search is not supported"),
)


def check_model(requested: str | None, info: ServedModel) -> None:
    """404 unless `requested` names the served model (or one of its aliases); omitted means the served one."""
    if requested is None or requested == info.served_model_name:
        return
    if requested in info.aliases or requested in PLACEHOLDER_MODEL_NAMES:
        return
    raise APIError(
        404,
        f"The model '{requested}' does not exist. This server serves '{info.served_model_name}'.",
        param="model",
        code="model_not_found",
    )


def check_n(n: int, max_n: int) -> None:
    """400 for an `n` over the server's --max-n (SamplingParams checks the lower bound)."""
    if n > max_n:
        raise APIError(400, f"'n' must be at most {max_n} on this server (--max-n), got {n}.", param="n")


def check_unicode(body: BaseModel) -> None:
    """400 naming the first string of `body` (keys included) that is not valid Unicode: a lone UTF-16
    surrogate (e.g. "\\ud800") that JSON escapes allow but no tokenizer or UTF-8 encoder accepts. The
    fast path's JSON parser rejects these already; FastAPI's does not."""
    where = _first_invalid_text(body.__dict__, "")
    if where is not None:
        raise APIError(
            400,
            f"Invalid value for '{where}': the text contains a lone UTF-16 surrogate (not valid Unicode).",
            param=where,
        )


def _first_invalid_text(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return None if value.isascii() or _encodes(value) else path
    if isinstance(value, BaseModel):
        value = value.__dict__
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and not _encodes(key):
                return path or None
            found = _first_invalid_text(item, inner)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_invalid_text(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reject_unsupported(request: Any, rules: Iterable[UnsupportedRule]) -> None:
    for name, accepted, why in rules:
        if not accepted(getattr(request, name)):
            raise APIError(400, f"'{name}' is not supported by this server: {why}.", param=name)


def check_chat_request(request: ChatCompletionRequest) -> None:
    """Reject chat requests batchlm cannot honour, before any work is done."""
    reject_unsupported(request, CHAT_UNSUPPORTED)
    _check_stream_options(request)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")


def check_completion_request(request: CompletionRequest) -> None:
    _check_stream_options(request)
    if request.suffix:
        raise APIError(
            400, "'suffix' is not supported by this server (no fill-in-the-middle).", param="suffix"
        )
    if request.best_of is not None and request.best_of != request.n:
        raise APIError(
            400,
            f"'best_of' must equal 'n' ({request.n}): server-side best-of is not supported.",
            param="best_of",
        )
    if request.echo and request.logprobs is not None:
        raise APIError(
            400,
            "'echo' with 'logprobs' is not supported: prompt log-probabilities are not computed.",
            param="echo",
        )


def _check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise APIError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def build_sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param_names: dict[str, str],
    prompt_field: str,
) -> tuple[SamplingParams, FieldNames]:
    """Map OpenAI (and extra) sampling fields onto SamplingParams, and say how the request spells the
    fields the input processor may name. Invalid values are a 400 naming the field as the client
    spelled it (`param_names` renames SamplingParams fields, e.g. logprobs)."""
    constraint = structured_outputs_of(request)
    try:
        params = SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            min_p=0.0 if request.min_p is None else request.min_p,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            seed=request.seed,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            ignore_eos=request.ignore_eos,
            stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
            stop_token_ids=request.stop_token_ids or [],
            logprobs=logprobs,
            logit_bias=_parse_logit_bias(request.logit_bias),
            skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            structured_outputs=None if constraint is None else constraint[1],
        )
    except SamplingParamsError as error:
        raise APIError(400, str(error), param=param_names.get(error.param, error.param)) from error
    structured_field = constraint[0] if constraint else "structured_outputs"
    return params, FieldNames(prompt_field, prompt_field, prompt_field, structured_field)


def _parse_logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise APIError(
                400,
                f"logit_bias keys must be token ids (integers as strings), got {key!r}.",
                param="logit_bias",
            ) from None
    return bias
