"""Request bodies of the OpenAI-compatible API (pydantic): OpenAI's fields plus batchlm's extra sampling fields."""

from __future__ import annotations

import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

# The conversation's models live beside their conversion to template messages (below the engine, which
# LLM.chat shares); request bodies build on them.
from batchlm.engine.chat_messages import ChatMessage as ChatMessage
from batchlm.engine.chat_messages import StrictModel as StrictModel
from batchlm.engine.chat_messages import function_type_only

# OpenAI's reasoning efforts (chat's `reasoning_effort`, the Responses API's `reasoning.effort`).
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


def _admits_none(annotation: Any) -> bool:
    return annotation is None or (
        get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)
    )


# pydantic's error type and word for each kind of number.
_NUMBER_KINDS: dict[Any, tuple[str, str]] = {int: ("int_type", "integer"), float: ("float_type", "number")}


def _number_kind(annotation: Any) -> tuple[str, str] | None:
    """The kind of number a field of this type takes (an int or a float, or else null), if it takes one."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return _NUMBER_KINDS.get(annotation)


class BooleansAreNotNumbers(StrictModel):
    """A request body whose number fields refuse JSON's true and false, as OpenAI's API does. pydantic
    would read them as 1 and 0: {"logprobs": false} on /v1/completions would ask for logprobs, and
    {"max_tokens": true} for one token."""

    # The keys (aliases where set) of the fields that take a number, with the kind their error names.
    _number_fields: ClassVar[dict[str, tuple[str, str]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._number_fields = {
            field.alias or name: kind
            for name, field in cls.model_fields.items()
            if (kind := _number_kind(field.annotation))
        }

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, data: Any) -> Any:
        # One pass over the body's keys: a validator on every field would cost each request more.
        if isinstance(data, dict):
            for name, value in data.items():
                if type(value) is bool and (kind := cls._number_fields.get(name)):
                    error_type, word = kind
                    message = f"Input should be a valid {word}, not a boolean"
                    error = InitErrorDetails(
                        type=PydanticCustomError(error_type, message), loc=(name,), input=value
                    )
                    raise ValidationError.from_exception_data(cls.__name__, [error])
        return data


class NullMeansDefault(BooleansAreNotNumbers):
    """A request body whose optional fields take their default when sent as JSON null, as OpenAI's API
    declares them ("boolean or null", "integer or null": `n`, `stream`, `logprobs`, `echo`, ...) and as
    clients that write every unset field send them. Fields whose type takes None keep the null."""

    # The keys (aliases where set) of the fields with a default whose type does not take None.
    _null_means_default: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._null_means_default = frozenset(
            field.alias or name
            for name, field in cls.model_fields.items()
            if not field.is_required() and field.default is not None and not _admits_none(field.annotation)
        )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_of_defaulted_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(key, 0) is None for key in cls._null_means_default):
            return {
                key: value
                for key, value in data.items()
                if value is not None or key not in cls._null_means_default
            }
        return data


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    # The arguments' JSON schema.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: str
    function: FunctionDefinition

    @field_validator("type")
    @classmethod
    def _function_tools_only(cls, kind: str) -> str:
        return function_type_only(kind, "tool_type", "tools", "tools")


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: str
    function: FunctionName


class AllowedTools(StrictModel):
    mode: Literal["auto", "required"]
    # Each {"type": "function", "function": {"name": ...}}.
    tools: list[NamedToolChoice]


class AllowedToolsChoice(StrictModel):
    """OpenAI's {"type": "allowed_tools", ...}: the model may call only these tools (batchlm.tools.spec)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class PromptCacheOptions(StrictModel):
    """OpenAI's prompt-caching hints. Accepted and not acted on: the prefix cache keeps every prompt's
    blocks while the KV cache has room, with no breakpoints or lifetimes to set."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: str | None = None


class StreamOptions(StrictModel):
    # Send a last chunk with the token usage (and empty choices) before [DONE].
    include_usage: bool | None = None
    # OpenAI pads its chunks with random characters against length side channels unless this is
    # false; chunks here are never padded, which every client accepts (false's behaviour), so either
    # value is taken and changes nothing.
    include_obfuscation: bool | None = None


class StructuredOutputsField(StrictModel):
    """vLLM's `structured_outputs`: exactly one constraint on the output."""

    # A JSON schema (an object, or the schema serialized as a string).
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    # Lark, or GBNF (recognised by `::=`).
    grammar: str | None = None


class SamplingFields(NullMeansDefault):
    """Sampling fields shared by chat and completions (OpenAI names, then batchlm's extras)."""

    model: str | None = Field(None, description="Served model name or alias; omitted = the served model.")
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    max_tokens: int | None = Field(
        None,
        description="Omitted = the model's max_new_tokens, else up to the context limit "
        "(on /v1/completions too: not OpenAI's legacy 16).",
    )
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # OpenAI sends token ids as JSON object keys, hence strings.
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    # batchlm (vLLM-style) extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_prompt_tokens: int | None = Field(
        None, description="Keep only the prompt's last k tokens (-1: the context length)."
    )
    prompt_logprobs: int | None = Field(
        None,
        description="vLLM's: each prompt token's logprob and its k most likely alternatives (not streamed).",
    )
    # Constrained decoding (vLLM's field, and its older guided_* fields).
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


# The tool_choice objects chat takes, named when one of another shape comes.
CHAT_TOOL_CHOICE_FORMS = (
    "it must be 'none', 'auto', 'required', {'type': 'function', 'function': {'name': <string>}} or "
    "{'type': 'allowed_tools', 'allowed_tools': {'mode': 'auto' | 'required', 'tools': [...]}}"
)


class ChatPromptFields(NullMeansDefault):
    """What a chat request's prompt is rendered from besides its messages: chat's and /tokenize's
    (server.prompts renders both, so that /tokenize counts what chat prefills)."""

    tools: list[ChatTool] | None = None
    # Omitted: "auto" with tools, "none" without.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None = None
    parallel_tool_calls: bool | None = None
    # Chat-template controls.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Reasoning models only; reaches the chat template (batchlm.reasoning.registry.effort_template_kwargs).
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        # Another tool type's choice, or the Responses API's flat {"type": "function", "name": ...}:
        # the union's own complaint would name only its first member ('none', 'auto' or 'required').
        if isinstance(choice, dict):
            kind = choice.get("type")
            named = kind == "function" and isinstance(choice.get("function"), dict)
            if not named and kind != "allowed_tools":
                raise PydanticCustomError("tool_choice", CHAT_TOOL_CHOICE_FORMS)
        return choice


class ChatCompletionRequest(SamplingFields, ChatPromptFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Known OpenAI fields batchlm does not serve: a 400 names them unless they hold a neutral value.
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    web_search_options: Any = None
    moderation: Any = None
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(
        None, description="Accepted and ignored (prefix caching is automatic)."
    )
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    # How long-winded the answer should be: the model's own choice here (accepted, not acted on).
    verbosity: Literal["low", "medium", "high"] | None = None
    echo: bool = Field(
        False,
        description="vLLM's: the reply's content starts with the last message's text when that message is "
        "the assistant's (with continue_final_message, the whole message so far).",
    )


# A prompt: text, a batch of texts, token ids, or a batch of token-id lists. Token ids are JSON integers
# only: a batch of texts with one number in it (["1", 2]) is an error, not the token ids [1, 2].
PromptInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: PromptInput
    # The completion's top-k log-probabilities per token (OpenAI: up to 5; batchlm: up to 20).
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = Field(True, description="Add the tokenizer's BOS etc. to text prompts.")


class TokenizeRequest(ChatPromptFields):
    """POST /tokenize: either `prompt` (text) or `messages`, rendered as chat renders them (with the
    tools, template controls and reasoning effort chat takes), so its count is chat's prompt_tokens."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    # Text prompts only: a chat template writes its own special tokens.
    add_special_tokens: bool = True
    # vLLM's: also answer each token's vocabulary string (`token_strs`).
    return_token_strs: bool = False


class DetokenizeRequest(StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
