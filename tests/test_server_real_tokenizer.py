"""The server with batchlm's real Tokenizer (the shared `tiny_tokenizer` fixture: byte-level BPE, ChatML
template) behind the fake engine: chat template, token counts, logprob bytes, tokenize round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from batchlm.outputs import TokenLogprobs
from batchlm.server.background import BackgroundServer
from batchlm.server.logprobs import CompletionLogprobsBuilder
from batchlm.tokenizer.tokenizer import Tokenizer
from fake_engine import FakeEngine, openai_client

# Multi-byte characters: some BPE tokens hold only part of a character.
REPLY = "Grüße, wörld ✓ done."
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: Any) -> FakeEngine:
    return FakeEngine(tokenizer=tiny_tokenizer, reply=REPLY, max_model_len=400)


def test_chat_uses_the_models_template_and_counts_real_tokens(
    server: BackgroundServer, engine: FakeEngine, tiny_tokenizer: Any
) -> None:
    response = openai_client(server.base_url).chat.completions.create(model="fake-model", messages=MESSAGES)
    expected_prompt = tiny_tokenizer.apply_chat_template(MESSAGES)
    assert engine.calls[-1].prompt_token_ids == expected_prompt
    assert response.choices[0].message.content == REPLY
    assert response.usage.prompt_tokens == len(expected_prompt)
    assert response.usage.completion_tokens == len(tiny_tokenizer.encode(REPLY, add_special_tokens=False))


def test_streamed_text_reassembles_multibyte_characters(server: BackgroundServer) -> None:
    stream = openai_client(server.base_url).chat.completions.create(
        model="fake-model", messages=MESSAGES, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == REPLY


def test_logprob_bytes_are_the_tokens_exact_bytes(server: BackgroundServer, tiny_tokenizer: Any) -> None:
    response = openai_client(server.base_url).chat.completions.create(
        model="fake-model", messages=MESSAGES, logprobs=True, top_logprobs=1
    )
    content = response.choices[0].logprobs.content
    reply_ids = tiny_tokenizer.encode(REPLY, add_special_tokens=False)
    assert [entry.bytes for entry in content] == [list(tiny_tokenizer.token_bytes(t)) for t in reply_ids]
    assert bytes(b for entry in content for b in entry.bytes).decode() == REPLY
    assert [entry.token for entry in content] == [tiny_tokenizer.token_to_text(t) for t in reply_ids]


def _character_offsets(tokenizer: Any, token_ids: list[int]) -> list[int]:
    """Where each token's text begins: the characters its predecessors' bytes spell in full."""
    spelled = [b"".join(tokenizer.token_bytes(t) for t in token_ids[:i]) for i in range(len(token_ids))]
    return [len(data.decode("utf-8", errors="ignore")) for data in spelled]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_offsets_are_positions_in_the_text(
    server: BackgroundServer, tiny_tokenizer: Any, stream: bool
) -> None:
    # REPLY's "✓" is spelled by three tokens holding one or two of its bytes each.
    client = openai_client(server.base_url)
    reply_ids = tiny_tokenizer.encode(REPLY, add_special_tokens=False)
    shown = [tiny_tokenizer.token_to_text(t) for t in reply_ids]
    assert any("\\x" in token for token in shown)
    if stream:
        chunks = list(client.completions.create(model="fake-model", prompt="Hi", logprobs=0, stream=True))
        text = "".join(chunk.choices[0].text for chunk in chunks)
        offsets = [offset for chunk in chunks for offset in chunk.choices[0].logprobs.text_offset]
    else:
        choice = client.completions.create(model="fake-model", prompt="Hi", logprobs=0).choices[0]
        text, offsets = choice.text, choice.logprobs.text_offset
    assert text == REPLY
    assert offsets == _character_offsets(tiny_tokenizer, reply_ids)
    for token, offset in zip(shown, offsets, strict=True):
        if "\\x" not in token:  # a token of whole characters is found where its offset points
            assert text[offset : offset + len(token)] == token


def test_tokenize_and_detokenize_round_trip(server: BackgroundServer, tiny_tokenizer: Any) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": REPLY}).json()["tokens"]
    assert tokens == tiny_tokenizer.encode(REPLY)
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text == tiny_tokenizer.decode(tokens, skip_special_tokens=False)
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == tiny_tokenizer.apply_chat_template(MESSAGES)


def test_tokenize_returns_the_token_strings_asked_for(server: BackgroundServer, tiny_tokenizer: Any) -> None:
    for body in ({"prompt": REPLY}, {"messages": MESSAGES}):
        answer = httpx.post(f"{server.base_url}/tokenize", json={**body, "return_token_strs": True}).json()
        assert answer["token_strs"] == tiny_tokenizer.hf.convert_ids_to_tokens(answer["tokens"])
        assert len(answer["token_strs"]) == answer["count"] > 1
        plain = httpx.post(f"{server.base_url}/tokenize", json=body).json()
        assert plain["tokens"] == answer["tokens"] and plain["token_strs"] is None


def test_template_errors_are_400(server: BackgroundServer) -> None:
    # "messages" is apply_chat_template's own parameter: the error names the field that sent it.
    body = {"messages": MESSAGES, "chat_template_kwargs": {"messages": []}}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "chat_template_kwargs"
    assert "chat_template_kwargs" in response.json()["error"]["message"]


def test_a_token_after_an_unfinished_character_is_offset_past_its_replacement(tiny_tokenizer: Any) -> None:
    # A model may follow the first bytes of a multi-byte character with a token that cannot finish it:
    # the text shows U+FFFD for those bytes, and the next token's text comes after it.
    by_bytes = {tiny_tokenizer.token_bytes(t): t for t in range(tiny_tokenizer.vocab_size)}
    lead = next(t for b, t in by_bytes.items() if len(b) == 2 and b[0] >= 0xE0 and b[1] & 0xC0 == 0x80)
    ids = [by_bytes[b"ab"] if b"ab" in by_bytes else by_bytes[b"a"], lead, by_bytes[b"x"], lead, lead]
    text = b"".join(tiny_tokenizer.token_bytes(t) for t in ids).decode("utf-8", errors="replace")
    assert text[-4:] == "\ufffdx\ufffd\ufffd"
    entry = TokenLogprobs(logprob=-1.0, rank=1)
    builder = CompletionLogprobsBuilder(tiny_tokenizer, top_n=0)
    offsets = builder.add(ids[:3], [entry] * 3).text_offset + builder.add(ids[3:], [entry] * 2).text_offset
    start = len(text) - 4
    assert offsets == [0, start, start + 1, start + 2, start + 3]
    assert text[offsets[2]] == "x"


def test_text_offsets_leave_out_the_special_tokens_the_text_skips(tiny_tokenizer: Any) -> None:
    # skip_special_tokens (the default) leaves <|im_start|> out of the text: it takes no place there.
    engine = FakeEngine(tokenizer=tiny_tokenizer, reply="Hi<|im_start|> there", max_model_len=400)
    with BackgroundServer(engine) as running:
        client = openai_client(running.base_url)
        choice = client.completions.create(model="fake-model", prompt="Hi", logprobs=0).choices[0]
    tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
    assert choice.text == "Hi there"
    after = tokens.index("<|im_start|>") + 1
    assert offsets[after] == len("Hi") and choice.text[offsets[after] :].startswith(tokens[after])


def test_echoed_offsets_leave_out_a_sentencepiece_dummy_prefix(tmp_path: Path) -> None:
    # Llama 2 style: the encoding puts "▁" before the text's first word, which the echoed text lacks.
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "\u2581Hello", "\u2581world", "\u2581", *"Hdehlorw,"]
    backend = Backend(models.Unigram([(piece, -1.0) for piece in pieces], unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    text = "Hello world, hello"
    ids = tokenizer.encode(text)
    assert tokenizer.token_to_text(ids[1]) == " Hello" and tokenizer.decode(ids) == text
    entry = TokenLogprobs(logprob=-1.0, rank=1)
    echoed = CompletionLogprobsBuilder(tokenizer, top_n=0, spelled=text).add(
        ids, [None] + [entry] * (len(ids) - 1)
    )
    assert echoed.text_offset[:4] == [0, 0, len("Hello"), len("Hello world")]
    for token, offset in zip(echoed.tokens[1:], echoed.text_offset[1:], strict=True):
        assert text[offset:].startswith(token.strip() if offset == 0 else token)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLED = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": MESSAGES},
        {"messages": MESSAGES, "tools": [WEATHER_TOOL]},
        {"messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "none"},
        {"messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "required"},
        {
            "messages": MESSAGES,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        },
        {"messages": CALLED, "tools": [WEATHER_TOOL]},
        {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False}},
        {"messages": [*MESSAGES, {"role": "user", "content": "More"}], "add_generation_prompt": False},
        {
            "messages": [*MESSAGES, {"role": "assistant", "content": "Well,"}],
            "continue_final_message": True,
            "add_generation_prompt": False,
        },
    ],
    ids=[
        "plain",
        "tools",
        "tools-none",
        "tools-required",
        "tools-named",
        "tool-history",
        "kwargs",
        "no-gen",
        "continue",
    ],
)
def test_tokenize_counts_what_chat_prefills(
    server: BackgroundServer, engine: FakeEngine, body: dict[str, Any]
) -> None:
    """/tokenize takes chat's rendering inputs (tools, tool_choice, template controls) and renders them
    as chat does: its tokens are the prompt the engine gets, its count chat's usage.prompt_tokens."""
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        tokenized = http.post("/tokenize", json=body)
        assert tokenized.status_code == 200, tokenized.text
        chat = http.post("/v1/chat/completions", json={**body, "max_tokens": 2})
        assert chat.status_code == 200, chat.text
    assert tokenized.json()["tokens"] == engine.calls[-1].prompt_token_ids
    assert tokenized.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    # The tools are in the prompt (this template has no place for them: a generic prompt shows them,
    # except under tool_choice "none").
    if "tools" in body and body.get("tool_choice") != "none":
        assert tokenized.json()["count"] > len(
            http_tokens(server, {**body, "tools": None, "tool_choice": None})
        )


def http_tokens(server: BackgroundServer, body: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi", "tools": [WEATHER_TOOL]}, "tools"),
        ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
        (
            {
                "messages": MESSAGES,
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        ({"messages": MESSAGES, "reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_tokenize_refuses_what_chat_refuses_in_rendering(
    server: BackgroundServer, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
