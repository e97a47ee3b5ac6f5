"""Tests for chat-template rendering (Tokenizer.apply_chat_template) and --chat-template resolution."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchlm.tokenizer.builder import build_tokenizer
from batchlm.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE, resolve_chat_template
from batchlm.tokenizer.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
]
USER = [{"role": "user", "content": "Hi!"}]
CHATML = "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
KWARG_TEMPLATE = "{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}"
NO_BOS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


@pytest.fixture(scope="module")
def templateless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("no-template")
    build_tokenizer(directory, vocab_size=512, chat_template=None)
    return directory


def test_default_template_renders_chatml(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    with_prompt = tiny_tokenizer.render_chat_template(CONVERSATION)
    assert with_prompt == CHATML + "<|im_start|>assistant\n"
    assert tiny_tokenizer.render_chat_template(CONVERSATION, add_generation_prompt=False) == CHATML


def test_template_tokens_are_special_and_bos_appears_once(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.apply_chat_template(CONVERSATION)
    assert ids[:2] == [0, 2]  # <|begin_of_text|> <|im_start|>, BOS not doubled
    assert ids.count(0) == 1
    assert ids.count(3) == 2  # two <|im_end|>
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == CHATML + "<|im_start|>assistant\n"


def test_bos_added_when_template_omits_it(tiny_model_dir) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template=NO_BOS_TEMPLATE)
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert ids[:2] == [0, 2]
    assert ids.count(0) == 1


def test_content_parts_and_missing_content(tiny_tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    text = tiny_tokenizer.render_chat_template(messages, add_generation_prompt=False)
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


def test_non_text_content_part_is_an_error(tiny_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="only text content parts are supported, got image_url"):
        tiny_tokenizer.apply_chat_template(messages)


def test_continue_final_message(tiny_tokenizer: Tokenizer) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": "Sure, the answer is"}]
    text = tiny_tokenizer.render_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nSure, the answer is")
    with pytest.raises(ValueError, match="cannot both be true"):
        tiny_tokenizer.apply_chat_template(messages, continue_final_message=True)


def test_chat_template_kwargs_reach_the_template(tiny_model_dir) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template=KWARG_TEMPLATE)
    text = tokenizer.render_chat_template(USER, chat_template_kwargs={"greeting": "Ahoy"})
    assert text == "Ahoy Hi!"
    ids = tokenizer.apply_chat_template(USER, chat_template_kwargs={"greeting": "Ahoy"})
    assert tokenizer.decode(ids) == "Ahoy Hi!"


@pytest.mark.parametrize("key", ["tokenize", "add_generation_prompt", "chat_template"])
def test_reserved_chat_template_kwargs_are_refused(tiny_tokenizer: Tokenizer, key: str) -> None:
    with pytest.raises(ValueError, match=f"chat_template_kwargs may not set {key}"):
        tiny_tokenizer.apply_chat_template(USER, chat_template_kwargs={key: False})


def test_override_from_file(tmp_path: Path, tiny_model_dir) -> None:
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{% for m in messages %}<<{{ m['role'] }}>>{% endfor %}")
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template=str(template_file))
    assert tokenizer.render_chat_template(CONVERSATION) == "<<system>><<user>>"


def test_rendering_errors_are_value_errors(tiny_model_dir) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template=template)
    with pytest.raises(ValueError, match="roles must alternate"):
        tokenizer.apply_chat_template(USER)
    with pytest.raises(ValueError, match="at least one message"):
        tokenizer.apply_chat_template([])


def test_invalid_jinja_override_fails_at_load(tiny_model_dir) -> None:
    with pytest.raises(ValueError, match="not valid Jinja"):
        Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template="{% for m in messages %}oops")


def test_missing_template_error_points_to_the_flag(templateless_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(templateless_dir)
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match=r"has no chat template.*--chat-template"):
        tokenizer.apply_chat_template(USER)
    fixed = Tokenizer.from_pretrained(templateless_dir, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert fixed.apply_chat_template(USER)[:2] == [0, 2]


def test_named_templates_use_the_default(tiny_model_dir) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.hf.chat_template = {"default": KWARG_TEMPLATE, "tool_use": "{{ 'tools' }}"}
    assert Tokenizer(tokenizer.hf).chat_template == KWARG_TEMPLATE


TOOL_USE_TEMPLATE = (
    "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{{ messages[0]['content'] }}"
)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.fixture
def named_templates(tiny_model_dir) -> Tokenizer:
    """A tokenizer naming two templates, as Hermes' and Command R's tokenizer configs do."""
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.hf.chat_template = {"default": KWARG_TEMPLATE, "tool_use": TOOL_USE_TEMPLATE}
    return Tokenizer(tokenizer.hf)


def test_a_conversation_with_tools_renders_the_tool_use_template(named_templates: Tokenizer) -> None:
    # As transformers' apply_chat_template(tools=...) and vLLM choose.
    with_tools = named_templates.render_chat_template(USER, False, {"tools": TOOLS})
    assert with_tools == named_templates.hf.apply_chat_template(USER, tools=TOOLS, tokenize=False)
    assert with_tools == "[lookup]Hi!"
    assert named_templates.render_chat_template(USER, False, {"greeting": "Hello"}) == "Hello Hi!"
    assert named_templates.chat_template_for(tools=True) == TOOL_USE_TEMPLATE


def test_the_chat_endpoint_renders_tools_with_the_tool_use_template(named_templates: Tokenizer) -> None:
    from batchlm.server.prompts import render_chat
    from batchlm.server.protocol import ChatMessage

    messages = [ChatMessage(role="user", content="Hi!")]
    ids = asyncio.run(
        render_chat(
            named_templates,
            messages,
            add_generation_prompt=False,
            continue_final_message=False,
            chat_template_kwargs=None,
            tools=TOOLS,
        )
    )
    # The tool_use template shows the tools itself: no generic tools prompt is added.
    assert named_templates.decode(ids, skip_special_tokens=True) == "[lookup]Hi!"


def test_an_override_replaces_every_named_template(tiny_model_dir) -> None:
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir("llama"), chat_template=NO_BOS_TEMPLATE)
    tokenizer.hf.chat_template = {"default": KWARG_TEMPLATE, "tool_use": TOOL_USE_TEMPLATE}
    overridden = Tokenizer(tokenizer.hf, chat_template=NO_BOS_TEMPLATE)
    assert overridden.chat_template_for(tools=True) == NO_BOS_TEMPLATE
    assert Tokenizer(tokenizer.hf).chat_template_for(tools=False) == KWARG_TEMPLATE


def test_resolve_chat_template(tmp_path: Path) -> None:
    literal = "{{ messages[0]['content'] }}"
    assert resolve_chat_template(literal) == literal
    template_file = tmp_path / "t.jinja"
    template_file.write_text(literal)
    assert resolve_chat_template(template_file) == literal
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="empty"):
        resolve_chat_template("  ")
    (tmp_path / "empty.jinja").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        resolve_chat_template(tmp_path / "empty.jinja")
