"""What the tests of gpt-oss's harmony replies share: a real byte-level tokenizer whose harmony markers
are special tokens (decoding without special tokens would hide them), a chat template in harmony markup
written here, the replies a fake engine gives in that markup, and how a test reads the prompt and the
grammar a request reached the engine with."""

from __future__ import annotations

import copy

from batchlm.tokenizer.tokenizer import Tokenizer
from batchlm.tools.harmony import MARKERS
from fake_engine import FakeEngine

# A minimal template in harmony markup: the effort in the system message, each tool with its
# description (gpt-oss's own adds the two as strings, so a missing one fails), an assistant's thinking
# as an analysis message and its calls with the recipient in the header, as gpt-oss's own does.
TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}"
    "{% if tools %}\n# Tools{% for t in tools %}{{ ' ' + t.function.name + ': ' + t.function.description }}"
    "{% endfor %}{% endif %}<|end|>"
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if m.thinking is defined %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% for c in m.tool_calls or [] %}<|start|>assistant to=functions.{{ c.function.name }}"
    "<|channel|>commentary json<|message|>{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
THOUGHT = "The user wants the weather in Paris."
ANALYSIS = f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant"
ANSWER = f"{ANALYSIS}<|channel|>final<|message|>It is sunny in Paris."
ARGUMENTS = '{"city": "Paris"}'
# The preamble, then the call; <|call|> ends the generation and stays out of the text.
CALLING = (
    f"{ANALYSIS}<|channel|>commentary<|message|>Let me look.<|end|><|start|>assistant"
    f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}"
)
CALL_ALONE = (
    f"{ANALYSIS}<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}"
)


def harmony_engine(tiny_tokenizer: Tokenizer) -> FakeEngine:
    """A fake engine on the tiny tokenizer with the harmony markers added as special tokens (<|return|>
    and <|call|> its stop ids) and TEMPLATE as its chat template; it answers ANSWER."""
    hf = copy.deepcopy(tiny_tokenizer.hf)
    hf.add_tokens(list(MARKERS), special_tokens=True)
    stops = [hf.convert_tokens_to_ids("<|return|>"), hf.convert_tokens_to_ids("<|call|>")]
    return FakeEngine(tokenizer=Tokenizer(hf, stops, TEMPLATE), reply=ANSWER, max_model_len=4096)


def prompt(engine: FakeEngine) -> str:
    """The last prompt the engine got, as text with its markers."""
    return str(engine.tokenizer.decode(engine.calls[-1].prompt_token_ids, skip_special_tokens=False))


def grammar_of(engine: FakeEngine) -> str:
    """The grammar the last request decoded under: the whole output's, no thinking put before it."""
    constraint = engine.calls[-1].params.structured_outputs
    assert constraint is not None and constraint.grammar is not None and constraint.preamble is None
    return constraint.grammar
