"""gpt-oss's harmony output read into thinking, content and calls (the gpt_oss reasoning and tool-call
parsers): whole, cut short, and streamed over every split, which must add up to the whole."""

from __future__ import annotations

import pytest

from batchlm.reasoning.harmony import HarmonyReasoningParser
from batchlm.reasoning.message import AssistantMessage, MessageReader
from batchlm.tools.calls import ToolCall
from batchlm.tools.forced import NamedFunctionParser
from batchlm.tools.gpt_oss import GptOssParser
from batchlm.tools.parser import ToolParser
from stream_scan_harness import whole_scans_and_deltas

WEATHER = '{"city": "Paris", "unit": "celsius"}'
TIME = '{"zone": "CET <|x|> {"}'
ANALYSIS = "<|channel|>analysis<|message|>The user wants Paris.<|end|>"
NEXT = "<|start|>assistant"
CALL_WEATHER = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{WEATHER}"
IN_HEADER = f" to=functions.get_weather<|channel|>commentary json<|message|>{WEATHER}"

# (output, reasoning, content, calls as (name, arguments)); the stop token (<|return|>, <|call|>) is
# left out of the text, as the engine leaves it, unless written.
CASES: list[tuple[str, str | None, str | None, list[tuple[str, str]]]] = [
    (f"{ANALYSIS}{NEXT}<|channel|>final<|message|>It is sunny.", "The user wants Paris.", "It is sunny.", []),
    (f"{ANALYSIS}{NEXT}<|channel|>final<|message|>Done.<|return|>", "The user wants Paris.", "Done.", []),
    ("<|channel|>final<|message|>Just this.", None, "Just this.", []),
    (f"{ANALYSIS}{NEXT}{CALL_WEATHER}", "The user wants Paris.", None, [("get_weather", WEATHER)]),
    (f"{ANALYSIS}{NEXT}{CALL_WEATHER}<|call|>", "The user wants Paris.", None, [("get_weather", WEATHER)]),
    (
        f"{ANALYSIS}{NEXT}<|channel|>commentary<|message|>Let me look.<|end|>{NEXT}{CALL_WEATHER}",
        "The user wants Paris.",
        "Let me look.",
        [("get_weather", WEATHER)],
    ),
    (IN_HEADER, None, None, [("get_weather", WEATHER)]),
    (f"{ANALYSIS}{NEXT}{IN_HEADER}<|call|>", "The user wants Paris.", None, [("get_weather", WEATHER)]),
    (
        f"{CALL_WEATHER}<|call|>{NEXT} to=functions.get_time<|channel|>commentary json<|message|>{TIME}",
        None,
        None,
        [("get_weather", WEATHER), ("get_time", TIME)],
    ),
    # Two analysis messages, a blank line apart; a preamble addressed to the assistant is content.
    (
        f"{ANALYSIS}{NEXT}<|channel|>analysis<|message|>More.<|end|>{NEXT}"
        "<|channel|>commentary to=assistant<|message|>Shown.",
        "The user wants Paris.\n\nMore.",
        "Shown.",
        [],
    ),
    # A built-in tool's call (not run here) is neither content nor a call.
    (
        f"{ANALYSIS}{NEXT}<|channel|>analysis to=python<|message|>print(1)<|call|>",
        "The user wants Paris.",
        None,
        [],
    ),
    # Markup that does not read as messages is content from there on, as written.
    ("Plain text, no markup.", None, "Plain text, no markup.", []),
    ("<|channel|>final<|message|>Broken <|channel|> here", None, "Broken <|channel|> here", []),
    (f"{ANALYSIS}text between<|start|>", "The user wants Paris.", "text between<|start|>", []),
    ("<|channel|>nowhere<|message|>Hi", None, "<|channel|>nowhere<|message|>Hi", []),
    (
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json<|call|>",
        None,
        "<|channel|>commentary to=functions.f <|constrain|>json<|message|>not json<|call|>",
        [],
    ),
]


def reader(tools: ToolParser | None = None) -> MessageReader:
    return MessageReader(HarmonyReasoningParser(), tools if tools is not None else GptOssParser())


def shape(message: AssistantMessage) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    # A stream cannot tell an empty thinking from none: both read as none.
    return message.reasoning or None, message.content, [(c.name, c.arguments) for c in message.tool_calls]


def streamed(read: MessageReader, pieces: list[str], cut_short: bool) -> AssistantMessage:
    """What a client adds up from the stream's deltas."""
    stream = read.stream()
    deltas = [stream.feed(piece) for piece in pieces] + [stream.finish(cut_short)]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls: dict[int, list[str]] = {}
    for piece in (call for delta in deltas for call in delta.tool_calls):
        if piece.name is not None:
            calls[piece.index] = [piece.name, ""]
        calls[piece.index][1] += piece.arguments
    made = tuple(ToolCall("id", name, arguments) for _, (name, arguments) in sorted(calls.items()))
    return AssistantMessage(reasoning or None, content or None, made, not stream.ends_in_calls and bool(made))


@pytest.mark.parametrize(("output", "reasoning", "content", "calls"), CASES)
def test_a_whole_output_reads_as_its_messages(
    output: str, reasoning: str | None, content: str | None, calls: list[tuple[str, str]]
) -> None:
    message = reader().read(output)
    assert shape(message) == (reasoning, content, calls)
    assert message.ends_in_calls == bool(calls)


@pytest.mark.parametrize("cut_short", [False, True], ids=["ended", "cut_short"])
@pytest.mark.parametrize("output", [case[0] for case in CASES])
def test_every_split_streams_what_the_whole_output_reads(output: str, cut_short: bool) -> None:
    whole = shape(reader().read(output, cut_short=cut_short))
    for at in range(len(output) + 1):
        assert shape(streamed(reader(), [output[:at], output[at:]], cut_short)) == whole, at
    assert shape(streamed(reader(), list(output), cut_short)) == whole


def test_a_reply_without_tools_is_its_thinking_and_answer() -> None:
    """With no tools the tool parser is not there: a call the model makes anyway stays in the content
    in harmony's call markup, as other families' markup does."""
    plain = MessageReader(HarmonyReasoningParser(), None)
    assert shape(plain.read(CASES[0][0])) == CASES[0][1:]
    _, content, _ = shape(plain.read(f"{ANALYSIS}{NEXT}{CALL_WEATHER}"))
    assert content == CALL_WEATHER


CUT = f"{ANALYSIS}{NEXT}<|channel|>commentary<|message|>Let me look.<|end|>{NEXT}{CALL_WEATHER}"


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # In the thinking: what came of it (as the other families' thinking, to its last character).
        (len("<|channel|>analysis<|message|>The user"), ("The user", None, [])),
        (len(f"{ANALYSIS[:-3]}"), ("The user wants Paris.<|en", None, [])),
        # In a header: nothing of it.
        (len(f"{ANALYSIS}{NEXT}<|channel|>comm"), ("The user wants Paris.", None, [])),
        # In the preamble, and in a call's arguments: as far as they got, the call cut off.
        (CUT.index("look.") + 2, ("The user wants Paris.", "Let me lo", [])),
        (CUT.index('"Paris"'), ("The user wants Paris.", "Let me look.", [("get_weather", '{"city": ')])),
    ],
)
def test_a_length_stop_keeps_what_was_settled(at: int, expected: tuple[object, ...]) -> None:
    message = reader().read(CUT[:at], cut_short=True)
    assert shape(message) == expected
    assert not message.ends_in_calls
    assert message.call_cut_off == bool(expected[2])


def test_a_cut_short_stream_sends_what_the_cut_short_read_gives() -> None:
    for at in range(len(CUT)):
        whole = shape(reader().read(CUT[:at], cut_short=True))
        assert shape(streamed(reader(), list(CUT[:at]), cut_short=True)) == whole, at


def test_a_forced_function_reads_its_arguments_from_the_final_message() -> None:
    """A forced tool_choice decodes plain JSON in the final message (no calls grammar of gpt-oss's)."""
    forced = reader(NamedFunctionParser("get_weather"))
    output = f"{ANALYSIS}{NEXT}<|channel|>final<|message|>{WEATHER}"
    assert shape(forced.read(output)) == ("The user wants Paris.", None, [("get_weather", WEATHER)])


def test_without_the_reasoning_parser_calls_still_read() -> None:
    """--reasoning-parser none: the output stays as written, but for its calls."""
    output = f"{ANALYSIS}{NEXT}{IN_HEADER}<|call|>"
    message = MessageReader(None, GptOssParser()).read(output)
    assert shape(message) == (None, ANALYSIS, [("get_weather", WEATHER)])


def test_the_thinking_tokens_run_to_the_last_analysis_messages_end() -> None:
    parser = HarmonyReasoningParser()
    output = f"{ANALYSIS}{NEXT}<|channel|>final<|message|>Done."

    def decode(ids: object) -> str:
        return output[: len(ids)]  # type: ignore[arg-type]

    ids = list(range(len(output)))
    assert parser.thinking_tokens(ids, decode) == len(ANALYSIS)
    plain = "<|channel|>final<|message|>Done."
    assert parser.thinking_tokens(list(range(len(plain))), lambda ids: plain[: len(ids)]) == 0  # type: ignore[arg-type]


def test_a_long_answer_streams_without_reading_the_output_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool parser reads what the reasoning parser hands on from where it ended: a delta of a
    long answer or of long arguments costs no whole scan, only the markup around them does."""
    for body in (
        f"<|channel|>final<|message|>{'word ' * 400}",
        f'{CALL_WEATHER[:-1]}, "n": "{"x" * 2000}"}}',
    ):
        stream = HarmonyReasoningParser().stream()
        handed = [stream.feed(character).content for character in body] + [stream.finish().content]
        scans, sent = whole_scans_and_deltas(
            GptOssParser(), [piece for piece in handed if piece], monkeypatch
        )
        assert scans < 20, scans
        assert "".join(d.content for d in sent) + "".join(c.arguments for d in sent for c in d.tool_calls)
