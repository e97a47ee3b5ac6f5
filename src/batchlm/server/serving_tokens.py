"""POST /tokenize and /detokenize: the server's tokenizer and chat template, exposed for clients."""

from __future__ import annotations

import asyncio

from batchlm.server.errors import APIError, rejections_as_400
from batchlm.server.prompts import encode_text, render_chat
from batchlm.server.protocol import DetokenizeRequest, TokenizeRequest
from batchlm.server.responses import DetokenizeResponse, TokenizeResponse
from batchlm.server.state import ServerState

# Token lists longer than this are decoded in a worker thread, so that a long one (the body-size limit
# allows millions) does not hold up every other request on the event loop.
DECODE_OFFLOAD_TOKENS = 4096


async def tokenize(state: ServerState, body: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a text prompt, or of messages rendered with the chat template (exactly one of them)."""
    info = state.ready_model(body.model)
    tokenizer = state.engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Send exactly one of 'prompt' (text) or 'messages' (chat).", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise APIError(400, "'messages' must not be empty.", param="messages")
        tokens = await render_chat(
            tokenizer,
            body.messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
            processor=state.engine.input_processor,
        )
    else:
        processor = state.engine.input_processor
        tokens = await encode_text(tokenizer, body.prompt or "", body.add_special_tokens, processor)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=info.facts.max_model_len)


async def detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    """Text of any number of token ids (the body-size limit bounds them); long lists are decoded off
    the event loop."""
    state.ready_model(body.model)
    with rejections_as_400():
        state.engine.input_processor.check_token_ids(body.tokens, "tokens")
    tokenizer = state.engine.tokenizer

    def decode() -> str:
        text: str = tokenizer.decode(body.tokens, skip_special_tokens=False)
        return text

    long = len(body.tokens) > DECODE_OFFLOAD_TOKENS
    return DetokenizeResponse(prompt=await asyncio.to_thread(decode) if long else decode())
