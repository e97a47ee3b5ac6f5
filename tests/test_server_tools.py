"""Tool calling through the official openai client against a live server on a fake engine that replies
with a model's call markup: tool_choice auto (parsed, streamed, strict, beside a constrained answer) and
none. Forced choices: tests/test_server_tools_forced.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine
from tools_harness import (
    HERMES_REPLY,
    MARKUP,
    PARIS,
    TOOLS,
    USER,
    post,
    prompt_of,
    reply_of,
)


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(max_model_len=4096)


def test_auto_returns_the_calls_the_model_wrote(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert engine.calls[-1].params.structured_outputs is None
    # The fake's template knows no tools: they reach the model through the generic tools prompt.
    assert engine.tokenizer.last_chat["kwargs"]["tools"] == TOOLS
    assert "<tools>" in prompt_of(engine) and '"name": "get_weather"' in prompt_of(engine)


def test_a_reply_without_calls_is_plain_content(client: Any, engine: FakeEngine) -> None:
    engine.reply = "It is sunny in Paris <3"
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    assert response.choices[0].message.content == "It is sunny in Paris <3"
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"


def test_streaming_sends_openai_call_deltas_and_no_markup(client: Any, engine: FakeEngine) -> None:
    engine.reply = (
        HERMES_REPLY + '\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    chunks = list(client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me look."
    assert not any(marker in content for marker in MARKUP)
    pieces = [piece for c in chunks if c.choices for piece in c.choices[0].delta.tool_calls or ()]
    firsts = [p for p in pieces if p.id is not None]
    assert [(p.index, p.type, p.function.name, p.function.arguments) for p in firsts] == [
        (0, "function", "get_weather", ""),
        (1, "function", "get_time", ""),
    ]
    assert all(p.id.startswith("call_") for p in firsts)
    later = [p for p in pieces if p.id is None]
    assert all(p.type is None and p.function.name is None for p in later)
    arguments = ["".join(p.function.arguments for p in later if p.index == i) for i in (0, 1)]
    assert [json.loads(a) for a in arguments] == [{"city": "Paris", "unit": "celsius"}, {"zone": "CET"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_helper_accumulates_the_calls(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    with client.chat.completions.stream(model="fake-model", messages=USER, tools=TOOLS) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    assert final.choices[0].finish_reason == "tool_calls"


CALL_ALONE = HERMES_REPLY.removeprefix("Let me look.\n")


@pytest.mark.parametrize(
    ("reply", "tool_choice"),
    [
        (CALL_ALONE, "auto"),
        (HERMES_REPLY, "auto"),
        ("Sunny.", "auto"),
        (CALL_ALONE, "required"),
        ("Hi.", "none"),
    ],
    ids=["call-alone", "text-then-call", "text", "required", "none"],
)
def test_the_stream_helper_adds_up_the_message_create_gives(
    client: Any, engine: FakeEngine, reply: str, tool_choice: str
) -> None:
    """The client's stream helper accumulates the deltas into the message: the same as the response's,
    content included (null for calls alone, as OpenAI streams them: not the role chunk's empty text)."""
    engine.reply = reply
    fields = {"model": "fake-model", "messages": USER, "tools": TOOLS, "tool_choice": tool_choice}
    whole = client.chat.completions.create(**fields).choices[0]
    with client.chat.completions.stream(**fields) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.message.content == whole.message.content
    assert (streamed.message.content is None) == (reply == CALL_ALONE)
    calls = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or ()]
    assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()]
    assert streamed.finish_reason == whole.finish_reason


def test_tool_choice_none_parses_nothing_and_prompts_for_no_calls(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    response = client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, tool_choice="none"
    )
    assert response.choices[0].message.content == HERMES_REPLY
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason == "stop"
    assert engine.tokenizer.last_chat["kwargs"]["tools"] == TOOLS
    assert "<tools>" not in prompt_of(engine)


def sse_payloads(events: Any) -> list[dict[str, Any]]:
    return [json.loads(event.decode()[len("data: ") :]) for event in events]


def test_one_delta_holding_two_complete_calls_streams_both() -> None:
    from batchlm.outputs import CompletionOutput, RequestOutput
    from batchlm.reasoning.message import MessageReader
    from batchlm.server.protocol import ChatCompletionRequest
    from batchlm.server.serving_chat import ChatContext, ChatFormatter
    from batchlm.tools.use import chat_tool_use

    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS})
    context = ChatContext(
        request_id="chatcmpl-1", created=0, model="m", tokenizer=None, n=1, include_usage=False,
        top_logprobs=None, reader=MessageReader(None, chat_tool_use(request, "hermes", None).parser),
    )  # fmt: skip
    text = (
        f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    )
    output = RequestOutput("r", None, [], [CompletionOutput(0, text, [1], finish_reason="stop")], True)
    chunks = sse_payloads(ChatFormatter(context).delta(0, output))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[:-1] == [
        {"tool_calls": [{"index": 0, "id": deltas[0]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": PARIS}}]},
        {"tool_calls": [{"index": 1, "id": deltas[2]["tool_calls"][0]["id"], "type": "function",
                         "function": {"name": "get_time", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '{"zone": "CET"}'}}]},
    ]  # fmt: skip
    assert deltas[0]["tool_calls"][0]["id"] != deltas[2]["tool_calls"][0]["id"]
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_agent_loop_sends_the_reply_message_back(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    first = client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    message = first.choices[0].message
    call = message.tool_calls[0]
    engine.reply = "It is 21 degrees."
    history = [*USER, message, {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    second = client.chat.completions.create(model="fake-model", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "It is 21 degrees."
    sent = engine.tokenizer.last_chat["messages"]
    assert sent[2]["content"].startswith("Let me look.\n<tool_call>")
    assert sent[3]["content"] == "<tool_response>\n21 degrees\n</tool_response>"


def test_streamed_logprobs_of_held_back_text_are_not_lost(client: Any, engine: FakeEngine) -> None:
    engine.reply = HERMES_REPLY
    chunks = list(
        client.chat.completions.create(
            model="fake-model",
            messages=USER,
            tools=TOOLS,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == chunks[-1].usage.completion_tokens == len(HERMES_REPLY.encode())


# Granite 3.x's system prompt with tools, as its chat template writes it.
GRANITE_TEMPLATE = (
    "{%- if tools %}{%- set system_message = system_message + ' You are a helpful assistant with access to "
    "the following tools. When a tool is required to answer the user\\'s query, respond only with "
    "<|tool_call|> followed by a JSON list of tools used.' %}{%- endif %}"
)


def test_granite_calls_after_its_special_token_are_read_and_held_to_a_strict_function() -> None:
    """A Granite 3.x template (auto picks `granite`): the calls are a JSON array after `<|tool_call|>`, a
    special token that decoding keeps in the text so the calls read; a strict function's grammar and a
    forced choice's name that token."""
    from fake_engine import openai_client

    engine = FakeEngine(
        max_model_len=4096, reply=f'<|tool_call|>[{{"name": "get_weather", "arguments": {PARIS}}}]'
    )
    engine.tokenizer.chat_template = GRANITE_TEMPLATE
    # The fake's ids below 3 decode to nothing without special tokens: the marker is a special one.
    engine.tokenizer.added_tokens = {"<|tool_call|>": 1}
    with BackgroundServer(engine) as running:
        client = openai_client(running.base_url)
        for stream in (False, True):
            assert reply_of(client, stream) == ("", [("get_weather", PARIS)], "tool_calls"), stream
            assert engine.calls[-1].params.skip_special_tokens is False
        strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
        grammars = []
        for fields in ({"tools": strict}, {"tools": TOOLS, "tool_choice": "required"}):
            reply = post(running, {"model": "fake-model", **fields}).json()
            assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
            grammars.append(engine.calls[-1].params.structured_outputs.grammar)
    assert grammars[0].startswith("start: free (<[1]> calls)?")
    assert grammars[1].startswith("start: <[1]> calls")


# Seed-OSS's template names its markers in variables; the fake renders its own chat.
SEED_TEMPLATE = (
    "{%- set toolcall_begin_token = '<seed:tool_call>' -%}{%- set think_end_token = '</seed:think>' -%}"
    "{{ think_end_token }}{{ toolcall_begin_token }}"
)
SEED_REPLY = (
    "<seed:think>The user wants the weather.</seed:think>\n<seed:tool_call>\n<function=get_weather>\n"
    "<parameter=city>Paris</parameter>\n<parameter=unit>celsius</parameter>\n</function>\n</seed:tool_call>"
)


@pytest.mark.parametrize("special", [False, True], ids=["shown", "special"])
def test_seed_oss_thinking_and_calls_are_read_as_its_template_teaches(special: bool) -> None:
    """Under `auto` a Seed-OSS template picks its reasoning and tool parsers: the thinking comes as
    reasoning_content, the call in its tags as a call. Where the tokenizer has the thinking markers as
    special tokens, decoding keeps special tokens in the text so the markers read."""
    engine = FakeEngine(max_model_len=4096, reply=SEED_REPLY)
    engine.tokenizer.chat_template = SEED_TEMPLATE
    if special:  # the fake's ids below 3 decode to nothing without special tokens
        engine.tokenizer.added_tokens = {"<seed:think>": 0, "</seed:think>": 1}
    with BackgroundServer(engine) as running:
        reply = post(running, {"model": "fake-model", "tools": TOOLS}).json()
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", PARIS)
    ]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert engine.calls[-1].params.skip_special_tokens is not special


def test_auto_with_a_strict_function_holds_the_model_s_calls_to_its_schema(
    client: Any, engine: FakeEngine, server: BackgroundServer
) -> None:
    engine.reply = HERMES_REPLY
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1]]
    response = client.chat.completions.create(model="fake-model", messages=USER, tools=strict)
    calls = response.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", json.loads(PARIS))
    ]
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert grammar is not None and '"<tool_call>"' in grammar
    client.chat.completions.create(model="fake-model", messages=USER, tools=TOOLS)
    assert engine.calls[-1].params.structured_outputs is None, "no strict function: the model is free"
    broken = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "strin"}}}
    refused = post(server, {"model": "fake-model", "tools": [broken]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools[0].function.parameters"


def test_with_a_response_format_the_model_may_still_call_a_tool(client: Any, engine: FakeEngine) -> None:
    """As in OpenAI's API (and agent frameworks with a typed final output): the answer follows the
    schema, or the model calls tools instead."""
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "final", "schema": answer}}
    fields = {"model": "fake-model", "messages": USER, "tools": TOOLS, "response_format": response_format}
    engine.reply = '{"answer": 42}'
    reply = client.chat.completions.create(**fields)
    assert reply.choices[0].message.content == '{"answer": 42}' and not reply.choices[0].message.tool_calls
    grammar = engine.calls[-1].params.structured_outputs.grammar
    assert grammar is not None and grammar.startswith("start: answer | ") and '"answer"' in grammar
    engine.reply = f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
    reply = client.chat.completions.create(**fields)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_with_a_regex_or_choice_the_model_may_still_call_a_tool(client: Any, engine: FakeEngine) -> None:
    engine.reply = f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'
    for constraint, rule in [
        ({"regex": "[a-z]+"}, "answer: /[a-z]+/"),
        ({"choice": ["yes", "no"]}, "answer: /(?:yes|no)/"),
    ]:
        reply = client.chat.completions.create(
            model="fake-model", messages=USER, tools=TOOLS, extra_body={"structured_outputs": constraint}
        )
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
        grammar = engine.calls[-1].params.structured_outputs.grammar
        assert grammar.startswith("start: answer | ") and rule in grammar.splitlines()


def test_with_a_grammar_of_its_own_the_model_may_still_call_a_tool(
    client: Any, engine: FakeEngine, server: BackgroundServer
) -> None:
    """A Lark (or GBNF) grammar in structured_outputs takes the answer's place, a sub-grammar of the
    calls' grammar; one that does not compile is a 400 naming the field."""
    lark = 'start: "yes" | "no"'
    for reply in ("yes", f'<tool_call>{{"name": "get_weather", "arguments": {PARIS}}}</tool_call>'):
        engine.reply = reply
        answer = client.chat.completions.create(
            model="fake-model",
            messages=USER,
            tools=TOOLS,
            extra_body={"structured_outputs": {"grammar": lark}},
        )
        constraint = engine.calls[-1].params.structured_outputs
        assert constraint.grammar.startswith("start: answer | ") and "answer: @client" in constraint.grammar
        assert constraint.subgrammars == (("client", lark),)
    assert [c.function.name for c in answer.choices[0].message.tool_calls] == ["get_weather"]
    gbnf = 'root ::= "yes" | "no"'
    client.chat.completions.create(
        model="fake-model", messages=USER, tools=TOOLS, extra_body={"structured_outputs": {"grammar": gbnf}}
    )
    assert engine.calls[-1].params.structured_outputs.subgrammars[0][0] == "client"
    refused = post(
        server, {"model": "fake-model", "tools": TOOLS, "structured_outputs": {"grammar": "start: nope"}}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "structured_outputs"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_inside_a_call_cuts_it_off(client: Any, engine: FakeEngine, stream: bool) -> None:
    # The client's stop string ends the output inside the call: no markup becomes content, the call
    # keeps its arguments as far as they got, and the reply does not finish with "tool_calls", whether
    # streamed or not.
    engine.reply = HERMES_REPLY
    content, calls, reason = reply_of(client, stream, stop=['"unit"'])
    assert engine.calls[-1].params.stop == ['"unit"']
    assert content == "Let me look." and reason == "stop"
    [(name, arguments)] = calls
    assert name == "get_weather" and arguments.startswith('{"city": "Paris"')
    with pytest.raises(ValueError):
        json.loads(arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_after_a_call_leaves_it_whole(client: Any, engine: FakeEngine, stream: bool) -> None:
    engine.reply = HERMES_REPLY + "\nAnything after the call."
    content, calls, reason = reply_of(client, stream, stop=["</tool_call>"])
    assert (content, calls, reason) == ("Let me look.", [("get_weather", PARIS)], "tool_calls")


def test_a_malformed_call_reaches_a_streaming_client_as_its_text(client: Any, engine: FakeEngine) -> None:
    # The whole reply has the text as content and no call; the stream had announced the call before its
    # JSON broke, and sends no markup as its arguments.
    engine.reply = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>'
    )
    assert reply_of(client, False) == (engine.reply, [], "stop")
    content, calls, reason = reply_of(client, True)
    assert (content, reason) == (engine.reply, "stop")
    assert calls == [("get_weather", '{"city": ')]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_whose_json_escapes_a_lone_surrogate_is_answered(
    client: Any, server: BackgroundServer, engine: FakeEngine, stream: bool
) -> None:
    # Arguments written as a JSON string, holding the escape "\ud800" of no character: the call comes
    # back with the escape as written (not a 500 for text UTF-8 cannot encode), on chat and Responses.
    engine.reply = (
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"\\ud800 東\\"}"}\n</tool_call>'
    )
    expected = [("get_weather", '{"city": "\\ud800 東"}')]
    assert reply_of(client, stream)[1:] == (expected, "tool_calls")
    tools = [{"type": "function", **tool["function"]} for tool in TOOLS]
    body = {"model": "fake-model", "input": "Weather?", "tools": tools, "stream": stream}
    response = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 200
    if stream:
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        [done] = [e["response"] for e in events if e["type"] in ("response.completed", "response.failed")]
    else:
        done = response.json()
    assert done["status"] == "completed"
    assert [(item["name"], item["arguments"]) for item in done["output"]] == expected


def _chat_formatter(family: str) -> Any:
    from batchlm.reasoning.message import MessageReader
    from batchlm.server.protocol import ChatCompletionRequest
    from batchlm.server.serving_chat import ChatContext, ChatFormatter
    from batchlm.tools.use import chat_tool_use

    request = ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS})
    context = ChatContext(
        request_id="chatcmpl-1", created=0, model="m", tokenizer=None, n=1, include_usage=False,
        top_logprobs=None, reader=MessageReader(None, chat_tool_use(request, family, None).parser),
    )  # fmt: skip
    return ChatFormatter(context)


# Per family: words, a call that reads, then a call whose markup breaks part way.
BROKEN_AFTER_A_CALL = {
    "hermes": f'Let me look.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": \n</tool_call>',
    "mistral": f'Let me look.\n\n[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{{"zone": }}',
    "granite": f'Let me look.\n\n<|tool_call|>[{{"name": "get_weather", "arguments": {PARIS}}}]'
    '<|tool_call|>[{"name": "get_time", "arguments": {"zone": }}]',
    "llama3_json": f'{{"name": "get_weather", "parameters": {PARIS}}}; {{"name": "get_time", "parameters": {{"zone": }}}}',
    "qwen3_coder": "Let me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n<zone>",
    "seed_oss": "Let me look.\n<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n"
    "</function>\n</seed:tool_call>\n<seed:tool_call>\n<function=get_time>\n<zone>",
}


@pytest.mark.parametrize("family", list(BROKEN_AFTER_A_CALL))
@pytest.mark.parametrize(
    ("reason", "stop_reason"),
    [("stop", None), ("length", None), ("stop", "<END>")],
    ids=["eos", "length", "stop"],
)
def test_a_chat_reply_reads_the_same_streamed_in_any_pieces_or_whole(
    family: str, reason: str, stop_reason: str | None
) -> None:
    """Content, calls and finish_reason of a reply with a call that reads and, after it, one that breaks:
    the same whether the text streamed a character at a time, in token-like pieces, or at once, and as
    the non-streamed reply of it ("tool_calls" for the call that reads, "length" where cut at max_tokens)."""
    from batchlm.outputs import CompletionOutput, FinishReason, RequestOutput
    from batchlm.server.responding import ChoiceResult

    text = BROKEN_AFTER_A_CALL[family]
    whole = _chat_formatter(family).choices(
        {(0, 0): ChoiceResult([text], [1], finish_reason=FinishReason(reason), stop_reason=stop_reason)}
    )[0]
    expected_reason = "tool_calls" if reason == "stop" else reason
    assert whole.finish_reason == expected_reason
    assert [c.function.name for c in whole.message.tool_calls] == ["get_weather"]
    for size in (1, 4, len(text)):
        formatter = _chat_formatter(family)
        pieces = [text[at : at + size] for at in range(0, len(text), size)]
        chunks = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            finish = FinishReason(reason) if last else None
            output = CompletionOutput(
                0, piece, [1], finish_reason=finish, stop_reason=stop_reason if last else None
            )
            chunks += sse_payloads(formatter.delta(0, RequestOutput("r", None, [], [output], last)))
        deltas = [c["choices"][0]["delta"] for c in chunks]
        content = "".join(d.get("content") or "" for d in deltas)
        names = [t["function"]["name"] for d in deltas for t in d.get("tool_calls", ()) if "id" in t]
        assert content == (whole.message.content or ""), size
        assert names[:1] == ["get_weather"], size
        assert chunks[-1]["choices"][0]["finish_reason"] == expected_reason, size


@pytest.mark.parametrize(
    ("reply", "max_tokens"), [("<tool_call>\n{", 3), ("<tool_call>\n{", 12), ("\n\n<tool_call>", 2)]
)
def test_a_reply_with_no_text_has_content_null_streamed_or_not(
    client: Any, engine: FakeEngine, reply: str, max_tokens: int
) -> None:
    """Nothing to show (markup cut off by max_tokens before it read as a call, or blanks a call may
    follow): a stream sends no content after its role chunk's null, and the whole reply says null too."""
    engine.reply = reply
    body = {"model": "fake-model", "messages": USER, "tools": TOOLS, "max_tokens": max_tokens}
    [choice] = client.chat.completions.create(**body).choices
    chunks = [c for c in client.chat.completions.create(**body, stream=True) if c.choices]
    assert [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content is not None] == []
    assert choice.message.content is None and choice.message.tool_calls is None
    assert choice.finish_reason == chunks[-1].choices[0].finish_reason == "length"
