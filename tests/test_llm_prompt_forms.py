"""`LLM.generate` takes the prompt forms vLLM's offline API takes: text, token ids, and the dicts
{"prompt": text} and {"prompt_token_ids": ids}, alone or in a list, mixed. A dict with another key
is refused by name rather than read as a list of its keys. Like vLLM's, it shows a progress bar
(`use_tqdm`), here only once a call has run a moment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm import LLM, SamplingParams
from batchlm.engine import llm as llm_module

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Callable[..., Path]) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), device="cpu")


def tokens(outputs: list) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_prompt_dicts_generate_what_text_and_ids_do(llm: LLM) -> None:
    text = "hello there"
    ids = llm.get_tokenizer().encode(text)
    plain = tokens(llm.generate([text, ids], GREEDY))
    assert plain[0] == plain[1]
    as_dicts = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], GREEDY)
    assert tokens(as_dicts) == plain
    assert as_dicts[0].prompt == text and as_dicts[0].prompt_token_ids == ids
    assert as_dicts[1].prompt_token_ids == ids
    # A single dict is one prompt, not a list of its keys; ids with their text keep the text.
    (single,) = llm.generate({"prompt_token_ids": ids, "prompt": text}, GREEDY)
    assert list(single.outputs[0].token_ids) == plain[0] and single.prompt == text
    mixed = llm.generate([text, {"prompt_token_ids": ids}, ids, {"prompt": text}], GREEDY)
    assert tokens(mixed) == plain * 2


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"prompt": "hi", "multi_modal_data": {}}, "'multi_modal_data' is not supported"),
        ({}, "needs 'prompt' (text) or 'prompt_token_ids'"),
        ({"prompt": 5}, "'prompt' must be text"),
    ],
)
def test_a_prompt_dict_it_cannot_serve_is_refused_by_name(llm: LLM, prompt: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.generate(["a good prompt first", prompt], GREEDY)
    assert not llm.engine_core.has_work()  # the good prompt was not left queued


def test_one_bad_prompt_fails_the_call_with_nothing_left_running(llm: LLM) -> None:
    too_long = [1] * (llm.info.max_model_len + 1)
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate(["hello", too_long], GREEDY)
    assert not llm.engine_core.has_work()
    (output,) = llm.generate(["hello"], GREEDY)
    assert output.finished and len(output.outputs[0].token_ids) == 6


def test_a_progress_bar_counts_prompts_and_tokens_once_a_call_runs_long(
    llm: LLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm_module, "PROGRESS_DELAY_S", 0.0)
    llm.generate(["one", "two", "three"], GREEDY)
    bar = capsys.readouterr().err
    assert "Processed prompts" in bar and "3/3" in bar and "output" in bar and "tok/s" in bar
    llm.generate(["one", "two", "three"], GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""
    llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_no_progress_shows_before_its_delay(
    llm: LLM, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm_module, "PROGRESS_DELAY_S", 1e9)
    llm.generate(["one", "two"], GREEDY)
    assert "Processed prompts" not in capsys.readouterr().err


def test_a_progress_bar_factory_is_used_as_vllm_uses_it(llm: LLM) -> None:
    from tqdm import tqdm

    bars: list[tqdm] = []

    def quiet_bar(*args: object, **kwargs: object) -> tqdm:
        bar = tqdm(*args, **{**kwargs, "disable": True})  # type: ignore[call-overload]
        bars.append(bar)
        return bar

    outputs = llm.generate(["one", "two", "three"], GREEDY, use_tqdm=quiet_bar)
    assert len(outputs) == 3 and len(bars) == 1 and bars[0].total == 3


def test_a_numpy_array_of_ids_is_one_prompt(llm: LLM) -> None:
    import numpy as np

    ids = [1, 5, 9, 12]
    (single,) = llm.generate(np.array(ids), GREEDY)
    assert single.prompt_token_ids == ids
    assert tokens([single]) == tokens(llm.generate([ids], GREEDY))
    assert tokens(llm.generate(np.array([ids, ids]), GREEDY)) == tokens([single]) * 2
