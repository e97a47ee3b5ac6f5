"""A byte-level tokenizer with a plain chat template for server tests (FakeEngine's by default): one
token per UTF-8 byte."""

from __future__ import annotations

from typing import Any

from batchlm.tokenizer.tokenizer import NoChatTemplateError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# Where the fake says its model lies, in errors that name it (never to be shown to clients).
FAKE_MODEL_PATH = "/srv/models/fake-model"
BOS_ID, EOS_ID = 1, 2
BYTE_OFFSET = len(SPECIAL_TOKENS)


class FakeTokenizer:
    """Byte-level: token id = byte + 3; ids 0-2 are <pad>, <s>, </s>. Chat template: `<|role|>content\\n`."""

    vocab_size = 256 + BYTE_OFFSET
    eos_token_ids = (EOS_ID,)
    # One token per UTF-8 byte: a token never stands for more than one character.
    max_chars_per_token = 1
    # decode(skip_special_tokens=True) leaves out <pad>, <s> and </s>.
    skipped_special_ids = frozenset(range(BYTE_OFFSET))

    def __init__(self, has_chat_template: bool = True) -> None:
        self.has_chat_template = has_chat_template
        self.last_chat: dict[str, Any] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, pending = [], bytearray()
        for token_id in ids:
            if token_id >= BYTE_OFFSET:
                pending.append(token_id - BYTE_OFFSET)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special_tokens:
                out.append(SPECIAL_TOKENS[token_id])
        return "".join(out) + pending.decode("utf-8", errors="replace")

    def token_to_text(self, token_id: int) -> str:
        if token_id < BYTE_OFFSET:
            return SPECIAL_TOKENS[token_id]
        return bytes([token_id - BYTE_OFFSET]).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        """The vocabulary's strings (/tokenize's return_token_strs): a byte as its hex escape."""
        return [SPECIAL_TOKENS[t] if t < BYTE_OFFSET else f"<0x{t - BYTE_OFFSET:02X}>" for t in token_ids]

    def encode_many(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def render_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> str:
        if not self.has_chat_template:
            raise NoChatTemplateError(
                f"the model {FAKE_MODEL_PATH} has no chat template; supply one with --chat-template"
            )
        self.last_chat = {"messages": messages, "kwargs": chat_template_kwargs}
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if continue_final_message:
            return text[:-1]
        return text + "<|assistant|>" if add_generation_prompt else text

    def chat_ids(self, ids: list[int]) -> list[int]:
        return ids  # the fake's template writes no BOS, and the fake adds none to a chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[int]:
        text = self.render_chat_template(
            messages, add_generation_prompt, chat_template_kwargs, continue_final_message
        )
        return self.chat_ids(self.encode(text, add_special_tokens=False))
