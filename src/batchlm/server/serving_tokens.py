"""POST /tokenize and /detokenize: the server's tokenizer and chat template, exposed for clients."""

from __future__ import annotations

from batchlm.server.errors import APIError
from batchlm.server.prompts import encode_text, render_chat
from batchlm.server.protocol import DetokenizeRequest, TokenizeRequest
from batchlm.server.request_params import check_model, check_prompt_token_ids
from batchlm.server.responses import DetokenizeResponse, TokenizeResponse
from batchlm.server.state import ServerState


async def tokenize(state: ServerState, body: TokenizeRequest) -> TokenizeResponse:
    """Token ids of a text prompt, or of messages rendered with the chat template (exactly one of them)."""
    info = state.ready_model()
    check_model(body.model, info)
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
            max_model_len=info.max_model_len,
        )
    else:
        tokens = await encode_text(tokenizer, body.prompt or "", body.add_special_tokens, info.max_model_len)
    return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=info.max_model_len)


def detokenize(state: ServerState, body: DetokenizeRequest) -> DetokenizeResponse:
    info = state.ready_model()
    check_model(body.model, info)
    if body.tokens:
        check_prompt_token_ids(body.tokens, info.vocab_size, "tokens")
    text: str = state.engine.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return DetokenizeResponse(prompt=text)
