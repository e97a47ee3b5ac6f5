"""Parsers by name (`--tool-call-parser`), and the choice `auto` makes from the model's chat template."""

from __future__ import annotations

from batchlm.tools.gpt_oss import GptOssParser
from batchlm.tools.granite import GraniteParser
from batchlm.tools.harmony import is_harmony_template
from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser
from batchlm.tools.seed_oss import SeedOssParser

PARSERS: dict[str, type[ToolParser]] = {
    "gpt_oss": GptOssParser,
    "granite": GraniteParser,
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "qwen3_coder": Qwen3CoderParser,
    "seed_oss": SeedOssParser,
}
AUTO, NO_PARSER = "auto", "none"
TOOL_CALL_PARSER_CHOICES = (AUTO, *PARSERS, NO_PARSER)


def detect_parser_name(chat_template: str | None) -> str:
    """The family whose call markup the template teaches. A template that teaches none (SmolLM2's
    ChatML, for one) gets Hermes markup, which the generic tools prompt asks for."""
    template = chat_template or ""
    # gpt-oss's harmony markup first: its template shows no other family's markers.
    if is_harmony_template(template):
        return "gpt_oss"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    # Seed-OSS writes Qwen3-Coder's `<function=` calls in tags of its own: its tag first.
    if "<seed:tool_call>" in template:
        return "seed_oss"
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    # Granite 3.x's `<|tool_call|>` token before Hermes' `<tool_call>` tag: the more specific marker first.
    if "<|tool_call|>" in template:
        return "granite"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3_json"
    return "hermes"


def parser_class(setting: str, chat_template: str | None) -> type[ToolParser] | None:
    """The parser for `--tool-call-parser` (None for `none`)."""
    if setting == NO_PARSER:
        return None
    name = detect_parser_name(chat_template) if setting == AUTO else setting
    return PARSERS[name]
