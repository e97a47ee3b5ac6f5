"""Response bodies of the OpenAI-compatible API (pydantic), field for field as OpenAI sends them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class PromptTokensDetails(BaseModel):
    # Prompt tokens served from the prefix cache.
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    # Completion tokens a reasoning model spent thinking (its reasoning_content), end marker included.
    reasoning_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    # UTF-8 bytes of the token text.
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class PromptLogprob(BaseModel):
    """vLLM's entry for one token of a prompt position (its `Logprob`)."""

    logprob: float
    # 1-based rank of the token in the model's distribution at that position.
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's `prompt_logprobs`: per prompt token, the token itself and its `prompt_logprobs` most likely
# alternatives by token id (JSON object keys, hence text); None for the first, which nothing predicts.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


def _absent_when_none(value: object) -> bool:
    return value is None


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    # A JSON object, as text.
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # Present only when the model called tools, as in OpenAI's responses.
    tool_calls: list[ResponseToolCall] | None = Field(default=None, exclude_if=_absent_when_none)
    # A reasoning model's thinking (DeepSeek's and vLLM's field); present only when it thought.
    reasoning_content: str | None = Field(default=None, exclude_if=_absent_when_none)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None
    # vLLM's field: the stop string or stop_token_ids entry that ended the choice (null for EOS,
    # a length limit, or a choice still running).
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    # The serving configuration's digest (responding.system_fingerprint): as OpenAI's, answers to one
    # seeded request repeat only while it stays the same.
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    # vLLM's, for its `prompt_logprobs` field (the rendered conversation's tokens); absent otherwise.
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_absent_when_none)


class ChatChunkChoice(BaseModel):
    index: int
    # OpenAI sends only the keys that changed: {"role", "content"} first, then {"content"} or
    # {"tool_calls": [...]}, then {}.
    delta: dict[str, Any]
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's field, as ChatChoice's.
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    # The serving configuration's digest (responding.system_fingerprint): as OpenAI's, answers to one
    # seeded request repeat only while it stays the same.
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    # Present (null, then the totals in a last chunk) only with stream_options.include_usage.
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    # Character offset of each token in the choice's text (echoed prompt included).
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # vLLM's field, as ChatChoice's.
    stop_reason: str | int | None = None
    # vLLM's, for its `prompt_logprobs` field (the choice's prompt); absent otherwise.
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_absent_when_none)


class CompletionResponse(BaseModel):
    """Both the non-streaming response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    # The serving configuration's digest (responding.system_fingerprint): as OpenAI's, answers to one
    # seeded request repeat only while it stays the same.
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "batchlm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    # Each token's vocabulary string ('Ġhello' for byte-level BPE) when return_token_strs asked for them.
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info (vLLM's): what a client needs to tokenize and template as the server does
    (lm-evaluation-harness's remote tokenizer reads it)."""

    tokenizer_class: str
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    chat_template: str | None = None
    model_max_length: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
