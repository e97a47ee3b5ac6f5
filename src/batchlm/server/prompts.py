"""API input to token ids: chat messages through the chat template, text prompts through the tokenizer
(long texts through the tokenizer's BatchedEncoder, `tokenizer/batched_encoder.py`); and both ways
exposed to clients, POST /tokenize and /detokenize, and GET /tokenizer_info. /v1/chat/completions and
/tokenize render a conversation through the same function (render_chat), so that /tokenize
counts exactly the tokens chat prefills."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from batchlm.engine.chat_messages import template_conversation
from batchlm.engine.input_processor import InputProcessor
from batchlm.reasoning.registry import effort_template_kwargs, reasoning_markers
from batchlm.server.errors import APIError, rejections_as_400
from batchlm.server.protocol import ChatMessage, ChatPromptFields, DetokenizeRequest, TokenizeRequest
from batchlm.server.responses import DetokenizeResponse, TokenizeResponse, TokenizerInfo
from batchlm.server.state import ServerState
from batchlm.tokenizer.batched_encoder import batched_encoder
from batchlm.tokenizer.tokenizer import NoChatTemplateError, Tokenizer, checked_template_kwargs
from batchlm.tools.prompting import template_inputs
from batchlm.tools.spec import tool_plan
from batchlm.tools.use import template_tools, tool_prompt

logger = logging.getLogger(__name__)

# Texts longer than this (characters) are tokenized off the event loop; below a few hundred the
# hand-off would cost more than it frees (BENCHMARKS.md, "Figures that left the source").
OFFLOAD_CHARS = 512
# Chat messages longer than this in all are rendered through the template in a worker thread.
RENDER_OFFLOAD_CHARS = 16_384
# So are conversations of more messages than this, however short (each costs the template a loop
# turn: ten thousand empty ones take a fifth of a second), and any with tools (their schemas are
# rendered as JSON, and may be large).
RENDER_OFFLOAD_MESSAGES = 64
# Token lists longer than this are decoded in a worker thread, so that a long one (the body-size limit
# allows millions) does not hold up every other request on the event loop.
DECODE_OFFLOAD_TOKENS = 4096
# /tokenize fields that shape a chat rendering, meaningless for a text prompt.
CHAT_ONLY_FIELDS = ("tools", "tool_choice", "reasoning_effort")


async def encode_text(
    tokenizer: Tokenizer,
    text: str,
    add_special_tokens: bool,
    processor: InputProcessor | None = None,
    param: str = "prompt",
) -> list[int]:
    """Token ids of `text`. With a `processor`, a text too long to fit the context is a 400 before any
    tokenization; long texts are tokenized off the event loop."""
    if processor is not None:
        with rejections_as_400():
            processor.check_text_length(len(text), param)
    if len(text) <= OFFLOAD_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return await batched_encoder(tokenizer).encode(text, add_special_tokens)


def template_for(tokenizer: Tokenizer, tools: bool) -> str | None:
    """The chat template a conversation with (or without) tools renders with (Tokenizer.chat_template_for;
    a tokenizer without named templates has one)."""
    choose = getattr(tokenizer, "chat_template_for", None)
    return choose(tools) if choose is not None else getattr(tokenizer, "chat_template", None)


async def render_chat(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
    processor: InputProcessor | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_prompt: bool = True,
) -> list[int]:
    """Token ids of the conversation rendered by the model's chat template. `tools` reach the template
    as its `tools` variable; a template that does not use them gets them in a generic system prompt
    instead (unless not `tool_prompt`: tool_choice "none"), and tool history as text. With a
    `processor`, a rendering too long to fit the context is a 400 before tokenization."""
    try:
        checked_template_kwargs(chat_template_kwargs)
    except ValueError as error:  # named as the client's field, not as a failure of the template
        raise APIError(
            400, f"Invalid 'chat_template_kwargs': {error}.", param="chat_template_kwargs"
        ) from None
    with rejections_as_400():
        converted = template_conversation(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    converted, chat_template_kwargs = template_inputs(
        converted, tools, template_for(tokenizer, tools is not None), chat_template_kwargs, tool_prompt
    )

    def render() -> str:
        return tokenizer.render_chat_template(
            converted, add_generation_prompt, chat_template_kwargs, continue_final_message
        )

    try:
        size = sum(len(m["content"]) for m in converted)
        offload = size > RENDER_OFFLOAD_CHARS or len(converted) > RENDER_OFFLOAD_MESSAGES or bool(tools)
        text = await asyncio.to_thread(render) if offload else render()
    except NoChatTemplateError as error:
        _log_no_chat_template(str(error))
        raise APIError(
            400,
            "The model has no chat template, so chat messages cannot be rendered: send a text prompt to "
            "/v1/completions, or ask the server's operator to supply a template.",
            param="messages",
            code="no_chat_template",
        ) from error
    except Exception as error:  # the template runs on the client's messages and kwargs: their fault
        raise APIError(400, f"Could not apply the chat template: {error}", param="messages") from error
    return tokenizer.chat_ids(await encode_text(tokenizer, text, False, processor, param="messages"))


@functools.lru_cache(maxsize=1)
def _log_no_chat_template(detail: str) -> None:
    """The operator's fix (the model's path, --chat-template), logged once rather than per request."""
    logger.warning("a chat request was refused: %s", detail)


def template_kwargs_of(
    state: ServerState, body: ChatPromptFields, chat_template: str | None
) -> dict[str, Any] | None:
    """The template's variables: the client's chat_template_kwargs, and its reasoning_effort (400 for a
    model that does not reason)."""
    if body.reasoning_effort is None:
        return body.chat_template_kwargs
    if reasoning_markers(state.settings.reasoning_parser, chat_template) is None:
        why = "the model does not reason (see --reasoning-parser)"
        raise APIError(
            400, f"'reasoning_effort' is not supported with this model: {why}.", "reasoning_effort"
        )
    return effort_template_kwargs(body.reasoning_effort, chat_template, body.chat_template_kwargs)


async def tokenize(state: ServerState, body: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a text prompt, or of messages rendered with the chat template (exactly one of them)."""
    info = state.ready_model(body.model)
    tokenizer, processor = state.engine.tokenizer, state.engine.input_processor
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send exactly one of 'prompt' (text) or 'messages' (chat).", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise APIError(400, "'messages' must not be empty.", param="messages")
        template_kwargs = template_kwargs_of(state, body, template_for(tokenizer, bool(body.tools)))
        with rejections_as_400():  # tool schemas are compiled to check them: off the event loop
            plan = await asyncio.to_thread(tool_plan, body) if body.tools else tool_plan(body)
        tokens = await render_chat(
            tokenizer,
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=template_kwargs,
            processor=processor,
            tools=template_tools(plan),
            tool_prompt=tool_prompt(plan),
        )
    else:
        for name in CHAT_ONLY_FIELDS:
            if getattr(body, name) is not None:
                raise APIError(
                    400, f"'{name}' applies to 'messages' only, not to a text 'prompt'.", param=name
                )
        tokens = await encode_text(tokenizer, body.prompt or "", body.add_special_tokens, processor)
    token_strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(
        tokens=tokens, count=len(tokens), max_model_len=info.facts.max_model_len, token_strs=token_strs
    )


async def detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    """Text of any number of token ids (the body-size limit bounds them); long lists are decoded off
    the event loop."""
    state.ready_model(body.model)
    with rejections_as_400():
        state.engine.input_processor.check_token_ids(body.tokens, "tokens")
    tokenizer = state.engine.tokenizer

    def decode() -> str:
        return tokenizer.decode(body.tokens, skip_special_tokens=False)

    long = len(body.tokens) > DECODE_OFFLOAD_TOKENS
    return DetokenizeResponse(prompt=await asyncio.to_thread(decode) if long else decode())


def tokenizer_info(state: ServerState) -> TokenizerInfo:
    """The served tokenizer's special tokens and chat template."""
    info = state.ready_model()
    tokenizer = state.engine.tokenizer
    hf = getattr(tokenizer, "hf", None)

    def special(name: str) -> str | None:
        value = getattr(hf, name, None)
        return value if isinstance(value, str) else None

    return TokenizerInfo(
        tokenizer_class=type(hf if hf is not None else tokenizer).__name__,
        eos_token=special("eos_token"),
        bos_token=special("bos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        chat_template=getattr(tokenizer, "chat_template", None),
        model_max_length=info.facts.max_model_len,
    )
