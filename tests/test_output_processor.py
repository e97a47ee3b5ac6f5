"""OutputProcessor folding several engine steps at once (a front end that fell behind): one delta per
request with all its tokens, the same text as step by step, and stop strings still cut exactly."""

from __future__ import annotations

import pytest

from batchlm.engine.input_processor import ValidatedRequest
from batchlm.engine.output_processor import OutputProcessor
from batchlm.outputs import EngineCoreOutput, FinishReason, TokenLogprobs
from batchlm.sampling_params import SamplingParams
from batchlm.tokenizer.detokenizer import IncrementalDetokenizer
from batchlm.tokenizer.tokenizer import Tokenizer

PROMPT = [5, 6, 7]


def _steps(tokenizer: Tokenizer, text: str, core_id: str) -> list[EngineCoreOutput]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [EngineCoreOutput(core_id, (token,)) for token in ids]


def _processor(tiny_tokenizer: Tokenizer, stop: list[str] | None = None) -> tuple[OutputProcessor, str]:
    processor = OutputProcessor(tiny_tokenizer)
    params = SamplingParams(max_tokens=100, stop=stop or [])
    (core_id,) = processor.add_request("r", None, PROMPT, params, 0.0)
    return processor, core_id


def test_steps_processed_together_give_one_delta_with_every_token(tiny_tokenizer: Tokenizer) -> None:
    together, core_id = _processor(tiny_tokenizer)
    steps = _steps(tiny_tokenizer, "hello there, world", core_id)
    results, to_abort = together.process(steps, delta=True)
    assert to_abort == [] and len(results) == 1
    (completion,) = results[0].outputs
    assert completion.token_ids == [o.new_token_ids[0] for o in steps]

    one_by_one, _ = _processor(tiny_tokenizer)
    texts = [one_by_one.process([output], delta=True)[0][0].outputs[0].text for output in steps]
    assert completion.text == "".join(texts) == "hello there, world"


def test_a_stop_string_in_an_early_step_keeps_later_tokens_out(tiny_tokenizer: Tokenizer) -> None:
    processor, core_id = _processor(tiny_tokenizer, stop=["there"])
    steps = _steps(tiny_tokenizer, "hello there, world", core_id)
    results, to_abort = processor.process(steps, delta=True)
    (completion,) = results[0].outputs
    assert to_abort == [core_id]
    assert completion.text == "hello " and completion.finish_reason == "stop"
    # The tokens generated after the stop string (", world") are not part of the completion.
    stop_ids = tiny_tokenizer.encode("hello there", add_special_tokens=False)
    assert completion.token_ids == stop_ids


def test_steps_processed_together_finish_with_the_last_one(tiny_tokenizer: Tokenizer) -> None:
    processor, core_id = _processor(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_ids[0]
    steps = [
        EngineCoreOutput(core_id, (11,), num_cached_tokens=2, scheduled_time=1.5),
        EngineCoreOutput(core_id, (12,)),
        EngineCoreOutput(core_id, (eos,), finish_reason=FinishReason.STOP, stop_token_id=eos),
    ]
    results, _ = processor.process(steps, delta=True)
    (output,) = results
    (completion,) = output.outputs
    assert output.finished and completion.finish_reason == "stop" and completion.stop_reason == eos
    # The stop token stays in the ids but not in the text.
    assert completion.token_ids == [11, 12, eos]
    assert completion.text == tiny_tokenizer.decode([11, 12])
    assert output.num_cached_tokens == 2 and output.metrics is not None
    assert output.metrics.first_scheduled_time == 1.5


def test_cumulative_text_of_a_stop_string_sequence_fed_several_steps_at_once(
    tiny_tokenizer: Tokenizer,
) -> None:
    # Its steps are folded in one call each (a stop string may end it at any of them): the whole text
    # must still hold each step's text once (speculative decoding sends several tokens per step).
    processor, core_id = _processor(tiny_tokenizer, stop=["never seen"])
    results, to_abort = processor.process(_steps(tiny_tokenizer, "hello there, world", core_id), delta=False)
    assert to_abort == [] and results[0].outputs[0].text == "hello there, world"
    processor, core_id = _processor(tiny_tokenizer, stop=["there"])
    results, _ = processor.process(_steps(tiny_tokenizer, "hello there, world", core_id), delta=False)
    assert results[0].outputs[0].text == "hello "


def test_cumulative_outputs_repeat_everything_so_far_and_deltas_only_what_is_new(
    tiny_tokenizer: Tokenizer,
) -> None:
    steps = _steps(tiny_tokenizer, "hello there, world", "r")
    cumulative = OutputProcessor(tiny_tokenizer)
    deltas = OutputProcessor(tiny_tokenizer)
    params = SamplingParams(max_tokens=100, logprobs=0)
    for processor in (cumulative, deltas):
        processor.add_request("r", None, PROMPT, params, 0.0)
    seen_ids: list[int] = []
    delta_texts: list[str] = []
    handed_out = []
    for step in steps:
        step.new_logprobs = (TokenLogprobs(-0.5, 1),)
        (whole,) = cumulative.process([step], delta=False)[0]
        (delta,) = deltas.process([step], delta=True)[0]
        seen_ids.append(step.new_token_ids[0])
        assert whole.outputs[0].token_ids == seen_ids and len(whole.outputs[0].logprobs or ()) == len(
            seen_ids
        )
        assert (
            delta.outputs[0].token_ids == [step.new_token_ids[0]]
            and len(delta.outputs[0].logprobs or ()) == 1
        )
        delta_texts.append(delta.outputs[0].text)
        assert whole.outputs[0].text == "".join(delta_texts)
        handed_out.append((whole, delta))
    assert whole.outputs[0].text == "hello there, world"
    # Outputs handed out are never changed by later steps.
    first_whole, first_delta = handed_out[0]
    assert first_whole.outputs[0].token_ids == first_delta.outputs[0].token_ids == [steps[0].new_token_ids[0]]
    assert first_whole.outputs[0].text == first_delta.outputs[0].text == delta_texts[0]


def _finished_outputs(processor: OutputProcessor, steps: list[list[EngineCoreOutput]]) -> list[tuple]:
    """Feed each step's outputs as the offline loop does; the finished requests' completions."""
    finished = []
    for step in steps:
        results, _ = processor.process(step, delta=False, finished_only=True)
        for result in results:
            for c in result.outputs:
                finished.append(
                    (result.request_id, c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason)
                )
    return sorted(finished)


def test_text_made_at_the_finish_is_the_text_made_token_by_token(
    tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline (LLM) processing detokenizes a sequence once it finishes: the same texts as token by
    token, for stop tokens shown or not, special tokens kept or skipped, several tokens in one output,
    n > 1, and a sequence with stop strings (which is still watched token by token)."""
    eos = tiny_tokenizer.eos_token_ids[0]
    words = tiny_tokenizer.encode(" héllo there, wörld ✓ ok", add_special_tokens=False)
    requests = {
        "eos": SamplingParams(max_tokens=100),
        "eos-shown": SamplingParams(
            max_tokens=100, include_stop_str_in_output=True, skip_special_tokens=False
        ),
        "length": SamplingParams(max_tokens=len(words)),
        "two": SamplingParams(max_tokens=100, n=2),
        "stop-string": SamplingParams(max_tokens=100, stop=["wörld"]),
    }
    per_token = OutputProcessor(tiny_tokenizer)
    at_finish = OutputProcessor(tiny_tokenizer, text_when_finished=True)
    core_ids = {
        rid: at_finish.add_request(rid, None, PROMPT, params, 0.0) for rid, params in requests.items()
    }
    for rid, params in requests.items():
        per_token.add_request(rid, None, PROMPT, params, 0.0)
    steps: list[list[EngineCoreOutput]] = []
    for position in range(0, len(words), 2):  # two tokens an output: a verified draft, say
        last = position + 2 >= len(words)
        step = []
        for rid, ids in core_ids.items():
            for core_id in ids:
                tokens = tuple(words[position : position + 2])
                if not last:
                    step.append(EngineCoreOutput(core_id, tokens))
                elif rid == "length":
                    step.append(EngineCoreOutput(core_id, tokens, finish_reason=FinishReason.LENGTH))
                else:
                    stop = dict(finish_reason=FinishReason.STOP, stop_token_id=eos)
                    step.append(EngineCoreOutput(core_id, (*tokens, eos), **stop))  # type: ignore[arg-type]
        steps.append(step)
    expected = _finished_outputs(per_token, steps)
    calls: list[int] = []
    update = IncrementalDetokenizer.update
    monkeypatch.setattr(
        IncrementalDetokenizer, "update", lambda self, ids: calls.append(len(ids)) or update(self, ids)
    )
    assert _finished_outputs(at_finish, steps) == expected
    # One call with every token for each of the five sequences without stop strings; the stop-string
    # one is fed each step's tokens as they come (two at a time), until its stop string.
    whole = [n for n in calls if n >= len(words) - 1]
    assert len(whole) == 5 and all(n <= 2 for n in calls if n < len(words) - 1)
    texts = {(rid, index): text for rid, index, text, *_ in expected}
    assert texts["eos", 0] == tiny_tokenizer.decode(words)
    assert texts["eos-shown", 0].endswith(tiny_tokenizer.decode([eos], skip_special_tokens=False))
    assert texts["two", 1] == texts["two", 0] == texts["eos", 0]
    assert texts["stop-string", 0] == tiny_tokenizer.decode(words).split("wörld")[0]


def test_offline_sequences_are_reported_only_at_the_finish_unless_they_need_each_step(
    tiny_tokenizer: Tokenizer,
) -> None:
    """Offline (text made at the finish), a sequence is sent to the core as final_output_only unless
    its stop strings or logprobs need every step's output; a front end asks it for the requests whose
    sampling params say they are read only at the finish."""
    requests = {
        "plain": (SamplingParams(max_tokens=9, n=2), True),
        "stop-string": (SamplingParams(max_tokens=9, stop=["x"]), False),
        "logprobs": (SamplingParams(max_tokens=9, logprobs=0), False),
    }
    offline = OutputProcessor(tiny_tokenizer, text_when_finished=True)
    streaming = OutputProcessor(tiny_tokenizer)
    for rid, (params, final_only) in requests.items():
        request = ValidatedRequest(PROMPT, params)
        made = offline.add_validated(rid, request, (2,))
        assert [r.final_output_only for r in made] == [final_only] * params.n
        assert not any(r.final_output_only for r in streaming.add_validated(rid, request, (2,)))
        # A server response that is not streamed is read only when it finishes, as offline.
        unstreamed = ValidatedRequest(PROMPT, params.clone(final_output_only=True))
        made = streaming.add_validated(f"{rid}-unstreamed", unstreamed, (2,))
        assert [r.final_output_only for r in made] == [final_only] * params.n


def test_a_final_output_carries_the_time_of_its_first_token(tiny_tokenizer: Tokenizer) -> None:
    processor = OutputProcessor(tiny_tokenizer, text_when_finished=True)
    (core_id,) = processor.add_request("r", None, PROMPT, SamplingParams(max_tokens=3), 0.0)
    final = EngineCoreOutput(core_id, (11, 12, 13), finish_reason=FinishReason.LENGTH, first_token_time=5.0)
    [result], _ = processor.process([final], delta=False, finished_only=True)
    assert result.metrics is not None and result.metrics.first_token_time == 5.0
    assert result.metrics.last_token_time is not None and result.metrics.last_token_time > 5.0
    assert result.outputs[0].token_ids == [11, 12, 13]


def test_a_stop_string_completed_by_the_final_flush_ends_the_choice_as_a_stop(
    tiny_tokenizer: Tokenizer,
) -> None:
    """A character left incomplete at the end shows as U+FFFD only when the sequence finishes; a stop
    string it completes cuts the text there, and the choice says so."""
    from test_detokenizer import single_byte_ids

    processor, core_id = _processor(tiny_tokenizer, stop=["a\ufffd"])
    steps = _steps(tiny_tokenizer, "xa", core_id)
    (lead,) = single_byte_ids(tiny_tokenizer, "é".encode()[:1])
    steps.append(EngineCoreOutput(core_id, (lead,), finish_reason=FinishReason.LENGTH))
    results, _ = processor.process(steps, delta=True)
    (completion,) = results[0].outputs
    assert (completion.text, completion.finish_reason, completion.stop_reason) == ("x", "stop", "a\ufffd")


def _mixed_requests(processor: OutputProcessor) -> list[str]:
    """Requests whose outputs take each of process()'s paths: plain tokens, a stop string, logprobs, prompt
    logprobs (asked, and not yet seen when a plain output comes first), min_tokens and n = 2."""
    core_ids: list[str] = []
    for rid, params in [
        ("plain", SamplingParams(max_tokens=100)),
        ("stop", SamplingParams(max_tokens=100, stop=["lo t"])),
        ("logprobs", SamplingParams(max_tokens=100, logprobs=1)),
        ("scored", SamplingParams(max_tokens=100, prompt_logprobs=0)),
        ("early", SamplingParams(max_tokens=100, stop=["he"], min_tokens=3)),
        ("two", SamplingParams(max_tokens=100, n=2)),
    ]:
        core_ids += processor.add_request(rid, None, PROMPT, params, 0.0)
    return core_ids


def _mixed_steps(tokenizer: Tokenizer, core_ids: list[str]) -> list[list[EngineCoreOutput]]:
    ids = tokenizer.encode("hello there, hello world", add_special_tokens=False)
    steps: list[list[EngineCoreOutput]] = []
    for position, token in enumerate(ids):
        step = []
        for core_id in core_ids:
            if core_id == "logprobs":
                step.append(EngineCoreOutput(core_id, (token,), new_logprobs=(TokenLogprobs(-0.5, 1),)))
            elif core_id == "two:1" and position == 2:
                step.append(EngineCoreOutput(core_id, (token,), num_cached_tokens=3, scheduled_time=1.0))
            else:
                step.append(EngineCoreOutput(core_id, (token,)))
        steps.append(step)
    eos = tokenizer.eos_token_ids[0]
    steps.append([EngineCoreOutput(core_id, (eos,), finish_reason=FinishReason.STOP) for core_id in core_ids])
    return steps


@pytest.mark.parametrize("steps_at_once", [1, 3])
@pytest.mark.parametrize("text_when_finished", [False, True])
def test_outputs_in_columns_give_what_the_same_outputs_one_object_each_give(
    tiny_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, steps_at_once: int, text_when_finished: bool
) -> None:
    """The engine core's columns (CoreOutputs) take a path of their own for plain new tokens: every
    delta, abort and metric equals the one the outputs as objects give."""
    from types import SimpleNamespace

    from batchlm.engine import output_processor
    from batchlm.outputs import CoreOutputs

    clock = [1000.0]  # both processors see the same time for the same batch
    monkeypatch.setattr(output_processor, "time", SimpleNamespace(time=lambda: clock[0]))
    delta, finished_only = not text_when_finished, text_when_finished
    by_object, in_columns = (OutputProcessor(tiny_tokenizer, text_when_finished) for _ in range(2))
    core_ids = _mixed_requests(by_object)
    assert _mixed_requests(in_columns) == core_ids
    steps = _mixed_steps(tiny_tokenizer, core_ids)
    seen = []
    for start in range(0, len(steps), steps_at_once):
        batch = [output for step in steps[start : start + steps_at_once] for output in step]
        clock[0] += 1
        expected = by_object.process(batch, delta=delta, finished_only=finished_only)
        got = in_columns.process(CoreOutputs.of(batch), delta=delta, finished_only=finished_only)
        assert got == expected
        seen.append(expected)
    results = [result for step_results, _ in seen for result in step_results]
    # Every path was taken: a stop string's abort, finished requests, logprobs, prompt logprobs.
    assert any(to_abort for _, to_abort in seen)
    assert {r.request_id for r in results if r.finished} >= {"plain", "logprobs", "scored", "two"}
    assert any(c.logprobs for r in results for c in r.outputs)
    assert any(r.prompt_logprobs == [None] for r in results)
