"""Bodies of POST /v1/responses (OpenAI's Responses API), field for field as OpenAI names them: the
request, the response object and its output items. Input items, tools and the tool choice stay plain
JSON here: serving_responses reads them, so that a 400 names the exact item and field at fault."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from batchlm.sampling_params import MAX_TOP_LOGPROBS
from batchlm.server.protocol import NullMeansDefault, PromptCacheOptions, ReasoningEffort, StrictModel
from batchlm.server.responses import ChatTokenLogprob


class TextFormat(StrictModel):
    """`text.format`: plain text, any JSON object, or JSON under a schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    # The schema of a json_schema format.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    # How long-winded the answer should be; the model's own choice here (accepted, not acted on).
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(StrictModel):
    effort: ReasoningEffort | None = None
    # Summaries of the thinking are not written; reasoning items carry the thinking itself.
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(NullMeansDefault):
    """POST /v1/responses: the whole conversation in `input`, or its new turn after a stored response."""

    model: str | None = Field(None, description="Served model name or alias; omitted = the served model.")
    # Text (one user message) or a list of items: messages, function calls and their outputs, reasoning.
    # The items are checked one by one (responses_input), so that a 400 names the item at fault.
    input: str | list[Any]
    # A system message put before the input.
    instructions: str | None = None
    max_output_tokens: int | None = Field(
        None, description="Omitted = the model's max_new_tokens, else up to the context limit."
    )
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted and ignored (prefix caching is automatic)."
    )
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    # Keep the response for previous_response_id and GET (default true, unless --stored-responses 0).
    store: bool | None = None
    # "message.output_text.logprobs" adds the tokens' log-probabilities (top_logprobs alternatives each).
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream_options: dict[str, Any] | None = None
    # A stored response this one continues: its conversation comes before `input` (not its instructions).
    previous_response_id: str | None = None
    # Known OpenAI fields batchlm does not serve: a 400 names them unless they hold a neutral value.
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    context_management: list[Any] | None = None
    access_programs: dict[str, Any] | None = None
    # Image options; accepted and not acted on (image inputs are refused, so none is compressed).
    image: dict[str, Any] | None = None
    # "auto": a conversation longer than the context loses its oldest items until it fits.
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = None
    service_tier: str | None = None
    moderation: Any = None
    # batchlm (vLLM-style) extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    # Chat's per-token entries (token, logprob, bytes, top_logprobs), with include's logprobs.
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ReasoningItem(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    status: ItemStatus
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]


class FunctionCallItem(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    # A JSON object, as text.
    arguments: str


OutputItem = OutputMessage | ReasoningItem | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    # Tokens written to a cache billed for writes; the prefix cache here is automatic and costs none.
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: Literal["server_error"] = "server_error"
    message: str


class ResponseObject(BaseModel):
    """The response, as POST /v1/responses returns it and its stream's lifecycle events carry it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    # The request's settings, echoed as OpenAI echoes them.
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    reasoning: dict[str, Any]
    metadata: dict[str, str]
    user: str | None
    previous_response_id: str | None = None
    # Whether it is kept (GET /v1/responses/{id}, previous_response_id).
    store: bool = False
    background: Literal[False] = False
    truncation: Literal["auto", "disabled"] = "disabled"
    service_tier: str = "default"
