"""Chat templates: the built-in ChatML template and resolution of a --chat-template override."""

from __future__ import annotations

from pathlib import Path

# ChatML with a leading BOS. Content may be a string or a list of OpenAI-style parts; only text parts
# can be rendered, anything else stops rendering with an error rather than being dropped silently.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is defined"
    " and message['content'] is not none else '' -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- else -%}{{ raise_exception('only text content parts are supported, got ' + part['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_JINJA_MARKERS = ("{{", "{%", "{#")


def resolve_chat_template(value: str | Path) -> str:
    """Return the template text of a --chat-template value: a path to a file, or a literal template.

    Raises ValueError when the value is neither an existing file nor something that looks like Jinja,
    so a mistyped path is reported instead of being rendered as a constant prompt.
    """
    text = str(value)
    if not text.strip():
        raise ValueError("chat template is empty: pass a Jinja template or a path to a file holding one")
    if any(marker in text for marker in _JINJA_MARKERS):
        return text
    path = Path(text).expanduser()
    if path.is_file():
        template = path.read_text(encoding="utf-8")
        if not template.strip():
            raise ValueError(f"chat template file {path} is empty")
        return template
    raise ValueError(
        f"chat template {text!r} is neither an existing file nor a Jinja template "
        "(a literal template must contain '{{' or '{%')"
    )
