"""Chat messages as clients send them back, read into the messages a chat template renders (the
HTTP API's and LLM.chat's shared path, engine/chat_messages.py)."""

from __future__ import annotations

from typing import Any

import pytest

from batchlm.engine.chat_messages import final_message_text, parse_messages, template_messages
from batchlm.engine.client import RequestRejectedError

USER = {"role": "user", "content": "hi"}


def test_an_assistant_s_refusal_is_its_text_in_the_prompt_and_where_it_is_continued() -> None:
    # The prompt a continued message ends (continue_final_message, and `echo`'s text) is the text the
    # template renders for it: the refusal of a declined reply, not nothing.
    sent = parse_messages([USER, {"role": "assistant", "content": None, "refusal": "I can't."}])
    assert template_messages(sent)[1]["content"] == "I can't."
    assert final_message_text(sent) == "I can't."
    with_content = parse_messages([{"role": "assistant", "content": "Partly.", "refusal": "No."}])
    assert template_messages(with_content)[0]["content"] == final_message_text(with_content) == "Partly."


@pytest.mark.parametrize(
    ("message", "param"),
    [
        # A union's failure names the member that read furthest, without pydantic's member tags.
        ({"role": "user", "content": 5}, "messages[0].content"),
        ({"role": "user", "content": [1]}, "messages[0].content[0]"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "f"}}]},
            "messages[0].tool_calls[0].type",
        ),
    ],
)
def test_invalid_messages_name_the_field_as_the_http_api_does(message: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestRejectedError) as caught:
        parse_messages([message])
    assert caught.value.param == param
    assert str(caught.value).startswith(f"{param}: ")
