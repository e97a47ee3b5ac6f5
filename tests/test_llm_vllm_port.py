"""What a vLLM offline script passes `LLM` and `SamplingParams` either works as there or fails at once
with an error naming the argument, and a failed call leaves the engine as it was: a value of the wrong
type used to pass the range checks and break the engine's step for every later call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchlm import LLM, SamplingParams
from batchlm.engine.client import RequestRejectedError
from batchlm.engine.output_processor import OutputProcessor
from batchlm.sampling_params import SamplingParamsError, StructuredOutputs, StructuredOutputsParams
from batchlm.server.prompts import render_chat
from batchlm.server.protocol import ChatCompletionRequest

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Callable[..., Path]) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), device="cpu")


def token_ids(llm: LLM, params: SamplingParams = GREEDY) -> list[int]:
    return list(llm.generate("hello", params, use_tqdm=False)[0].outputs[0].token_ids)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 1.5),
        ("seed", "7"),
        ("logprobs", 1.5),
        ("max_tokens", 3.5),
        ("min_tokens", 1.5),
        ("n", True),
        ("top_k", 2.0),
        ("temperature", "0.5"),
        ("temperature", float("nan")),
        ("top_p", None),
    ],
)
def test_wrongly_typed_numbers_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(SamplingParamsError, match=field) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {1.5: 2.0}),
        ("logit_bias", {"1_0": 2.0}),
        ("logit_bias", {" 7": 2.0}),
        ("logit_bias", {"abc": 2.0}),
        ("logit_bias", {"9" * 5000: 2.0}),
        ("logit_bias", {"\u0663": 2.0}),  # an Arabic-Indic 3: a digit to str.isdigit, not to JSON
        ("logit_bias", {"\u00b2": 2.0}),  # a superscript 2, likewise
        ("logit_bias", {"": 2.0}),
        ("logit_bias", {True: 2.0}),
        ("logit_bias", {3: "x"}),
        ("logit_bias", {3: None}),
        ("logit_bias", [(3, 2.0)]),
        ("stop_token_ids", [1.5]),
        ("stop_token_ids", ["7"]),
        ("stop_token_ids", 7),
        ("stop", 7),
        ("ignore_eos", "no"),
        ("skip_special_tokens", None),
    ],
)
def test_wrongly_typed_token_ids_biases_and_flags_are_refused_by_name(field: str, value: Any) -> None:
    # int() would read 1.5 as 1, "1_0" as 10 and " 7" as 7; "no" is true.
    with pytest.raises(SamplingParamsError, match=field) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


def test_token_ids_as_decimal_text_and_numpy_values_are_read() -> None:
    params = SamplingParams(
        logit_bias={"7": 1, np.int64(8): np.float32(-2.5), "0012": 3}, stop_token_ids=(np.int32(9),)
    )
    assert params.logit_bias == {7: 1.0, 8: -2.5, 12: 3.0} and params.stop_token_ids == [9]
    assert all(type(key) is int and type(value) is float for key, value in params.logit_bias.items())


def test_numpy_numbers_are_taken_as_python_numbers() -> None:
    params = SamplingParams(seed=np.int64(3), max_tokens=np.int32(5), temperature=np.float32(0.5))
    assert type(params.seed) is int and type(params.max_tokens) is int and type(params.temperature) is float
    assert params.clone(top_k=np.int64(2)).top_k == 2


def test_stop_strings_and_constraints_are_checked_on_construction() -> None:
    with pytest.raises(SamplingParamsError, match="stop must be strings"):
        SamplingParams(stop=[5])  # type: ignore[list-item]
    with pytest.raises(SamplingParamsError, match="must be a StructuredOutputs"):
        SamplingParams(structured_outputs={"choice": ["a"]})  # type: ignore[arg-type]


def test_stop_strings_without_detokenizing_are_refused(llm: LLM) -> None:
    """As in vLLM: stop strings are matched in the text, so without it they would be ignored silently."""
    with pytest.raises(SamplingParamsError, match="detokenize") as caught:
        SamplingParams(stop=["a"], detokenize=False)
    assert caught.value.param == "stop"
    (output,) = llm.generate("hello", GREEDY.clone(detokenize=False, stop_token_ids=[7]), use_tqdm=False)
    assert output.outputs[0].text == "" and output.outputs[0].token_ids


@pytest.mark.parametrize("bad", [{"seed": 1.5}, {"logprobs": 1.5}, {"stop": [5]}, {"seed": "x"}])
def test_a_refused_call_leaves_the_engine_working(llm: LLM, bad: dict[str, Any]) -> None:
    before = token_ids(llm)
    with pytest.raises(SamplingParamsError):
        llm.generate(["ok", "bad"], [GREEDY, SamplingParams(max_tokens=3, **bad)], use_tqdm=False)
    assert not llm.engine_core.has_work()
    assert token_ids(llm) == before


def test_a_call_failing_while_queueing_leaves_nothing_queued(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    add = OutputProcessor.add_validated
    calls = []

    def failing_second(self: OutputProcessor, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("queueing failed")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(OutputProcessor, "add_validated", failing_second)
    with pytest.raises(RuntimeError, match="queueing failed"):
        llm.generate(["one", "two"], SamplingParams(n=2, max_tokens=3), use_tqdm=False)
    assert not llm.engine_core.has_work()


def test_sampling_params_of_the_wrong_kind_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="got 0 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [], use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate("a", {"max_tokens": 3}, use_tqdm=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
        llm.generate(["a"], [{"max_tokens": 3}], use_tqdm=False)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("prompts", "message"),
    [(None, "prompts must be"), (5, "prompts must be"), (["a", None], "each prompt must be")],
)
def test_prompts_of_the_wrong_kind_are_refused(llm: LLM, prompts: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        llm.generate(prompts, GREEDY, use_tqdm=False)


def test_a_schema_object_constrains_as_its_text_does(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    as_object = StructuredOutputsParams(json=schema)  # vLLM's name, and vLLM's form of the schema
    assert as_object == StructuredOutputs(json=json.dumps(schema, separators=(",", ":")))
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=as_object)
    text = llm.generate("x", params, use_tqdm=False)[0].outputs[0].text
    assert isinstance(json.loads(text)["a"], int)
    assert StructuredOutputs(choice=["a", "b"]).choice == ("a", "b")
    with pytest.raises(SamplingParamsError, match=r"structured_outputs\.json"):
        StructuredOutputs(json=5)  # type: ignore[arg-type]


def test_min_tokens_holds_back_stop_strings(llm: LLM) -> None:
    (forced,) = llm.get_tokenizer().encode("A", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=8, logit_bias={forced: 100.0}, min_tokens=3, stop=["A"])
    (completion,) = llm.generate("hello", params, use_tqdm=False)[0].outputs
    # The 4th token is the first a stop string may end in, as in vLLM: "A" ends the text there.
    assert list(completion.token_ids) == [forced] * 4
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("AAA", "stop", "A")


def test_chat_outputs_carry_the_rendered_prompt(llm: LLM) -> None:
    (output,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert output.prompt == tokenizer.render_chat_template(CONVERSATION)
    assert output.prompt_token_ids == tokenizer.apply_chat_template(CONVERSATION)


def test_the_tokenizer_takes_what_vllm_scripts_call_on_it(llm: LLM) -> None:
    """vLLM's get_tokenizer() gives transformers' tokenizer: scripts render prompts with it."""
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.render_chat_template(CONVERSATION)
    with_kwargs = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, enable_thinking=False)
    assert with_kwargs == tokenizer.render_chat_template(
        CONVERSATION, chat_template_kwargs={"enable_thinking": False}
    )
    ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    (output,) = llm.generate(text, GREEDY, use_tqdm=False)
    assert ids == tokenizer.apply_chat_template(CONVERSATION)
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token_id in tokenizer.eos_token_ids
    assert tokenizer.pad_token_id == tokenizer.hf.pad_token_id and len(tokenizer) == tokenizer.vocab_size
    generated = output.outputs[0].token_ids
    assert tokenizer.batch_decode([generated]) == [output.outputs[0].text]


def test_chat_takes_vllms_template_arguments(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    (plain,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert plain.prompt == tokenizer.render_chat_template(CONVERSATION, add_generation_prompt=False)
    started = [*CONVERSATION, {"role": "assistant", "content": "Sure"}]
    (continued,) = llm.chat(
        started, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert continued.prompt is not None and continued.prompt.endswith("Sure")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    (with_tools,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, tools=tools)
    assert with_tools.prompt is not None and "get_weather" in with_tools.prompt


# A template that adds content to strings, as most models' do (SmolLM2's among them): it cannot take
# a list of content parts, nor tool-call arguments left as a JSON string.
STRING_CONTENT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' + m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}{{ call['function']['name'] }}"
    "{{ call['function']['arguments'] | tojson }}{% endfor %}<|im_end|>\\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}"
)


def test_chat_takes_vllms_chat_template_argument(llm: LLM, tmp_path: Path) -> None:
    (output,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=STRING_CONTENT_TEMPLATE)
    assert output.prompt is not None and output.prompt.startswith("<|im_start|>system\nbe brief<|im_end|>")
    template_file = tmp_path / "template.jinja"
    template_file.write_text(STRING_CONTENT_TEMPLATE)
    (from_file,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=str(template_file))
    assert from_file.prompt == output.prompt
    (own,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)  # the model's template again
    assert own.prompt == llm.get_tokenizer().render_chat_template(CONVERSATION) != output.prompt


def test_chat_takes_messages_as_the_http_api_does(tiny_model_dir: Callable[..., Path]) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), device="cpu", chat_template=STRING_CONTENT_TEMPLATE)
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"x": 1}'}}
    sent = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]
    # What the template is given: one string per message, "developer" as "system"; the template
    # names no `tools`, so the call and its result are text (as SmolLM2's ChatML needs them).
    rendered_as = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi\nthere"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"x": 1}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\n2\n</tool_response>"},
    ]
    (output,) = llm.chat(sent, GREEDY, use_tqdm=False)
    expected = llm.get_tokenizer().hf.apply_chat_template(
        rendered_as, chat_template=STRING_CONTENT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert output.prompt == expected
    assert "<|im_start|>system\nbe brief" in expected and '"arguments": {"x": 1}' in expected
    # The HTTP API renders the same conversation to the same tokens.
    request = ChatCompletionRequest.model_validate({"messages": sent})
    http_ids = asyncio.run(
        render_chat(
            llm.get_tokenizer(),
            request.messages,
            add_generation_prompt=True,
            continue_final_message=False,
            chat_template_kwargs=None,
        )
    )
    assert output.prompt_token_ids == http_ids

    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(RequestRejectedError, match="type 'image_url' are not supported") as caught:
        llm.chat(image, GREEDY, use_tqdm=False)
    assert caught.value.param == "messages[0].content[0].type"
    with pytest.raises(RequestRejectedError, match="needs the last message to be from the assistant"):
        llm.chat(sent[:2], GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(RequestRejectedError, match=r"messages\[1\]\.content"):
        llm.chat([sent[0], {"role": "user", "content": 5}], GREEDY, use_tqdm=False)


def test_model_none_is_the_built_in_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchlm.engine import llm as llm_module

    def prepared(config: Any) -> Path:
        assert config.built_in_model
        raise LookupError("stop before loading")

    monkeypatch.setattr(llm_module, "prepare_model_dir", prepared)
    with pytest.raises(LookupError, match="stop before loading"):
        LLM(model=None)
    with pytest.raises(TypeError, match="model must be a path or a name"):
        LLM(model=5)  # type: ignore[arg-type]
