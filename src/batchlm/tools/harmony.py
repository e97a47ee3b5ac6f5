"""gpt-oss's "harmony" markup: an output is a run of messages, each a header, `<|message|>` and a body
that a terminator ends. The prompt ends with `<|start|>assistant`, so the first message's header starts
at once (`<|channel|>final`, or with its recipient first: ` to=functions.f<|channel|>commentary`);
later ones open with `<|start|>` and the role. A header names the channel (analysis: thinking; final:
the answer; commentary: a preamble the user may see, or a call), the recipient (`to=functions.NAME`: a
call of NAME, its body the arguments) and the body's type (`<|constrain|>json`). `<|return|>` and
`<|call|>` end the generation (they are EOS ids), so an output's last body may end with no terminator.

The markers are special tokens of gpt-oss's tokenizer: the detokenizer must keep them in the text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
CONSTRAIN = "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
MARKERS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, CALL, RETURN)
TERMINATORS = (END, CALL, RETURN)
CHANNELS = ("analysis", "commentary", "final")
# Where a call's recipient names a function the client offered.
FUNCTIONS = "functions."
# A header longer than this that has not reached its `<|message|>` is no header: the text is shown
# (a function name is 64 characters at most).
MAX_HEADER = 256
# A template in harmony markup shows this (`--tool-call-parser auto`, `--reasoning-parser auto`).
HARMONY_SIGN = CHANNEL
# gpt-oss knows three efforts (its template writes `Reasoning: <effort>` in the system message): it
# cannot switch thinking off, so OpenAI's lower ones ask for its least and "xhigh" for its most.
HARMONY_EFFORTS = {"none": "low", "minimal": "low", "xhigh": "high"}


def is_harmony_template(chat_template: str | None) -> bool:
    return HARMONY_SIGN in (chat_template or "")


@dataclass(frozen=True)
class Header:
    channel: str
    # `to=...`; None for none (or the assistant itself, as gpt-oss sometimes addresses a preamble).
    recipient: str | None
    # Where the body begins, just past `<|message|>`.
    body_at: int

    @property
    def function(self) -> str | None:
        """The function a call addresses; None for a message that is no call of a function."""
        if self.recipient is None or not self.recipient.startswith(FUNCTIONS):
            return None
        return self.recipient[len(FUNCTIONS) :] or None


# A header still arriving: it may yet read either way.
PENDING = "pending"


def read_header(text: str, pos: int, final: bool, bare: bool) -> Header | str | None:
    """The header of the message at text[pos]; PENDING while it may still complete (not `final`);
    None where it is no header. bare: the message may open without `<|start|>` (the output's first)."""
    at = text.find(MESSAGE, pos, pos + MAX_HEADER + len(MESSAGE))
    if at < 0:
        if final or len(text) - pos > MAX_HEADER:
            return None
        head = text[pos:]
        return PENDING if _may_open(head, bare) and not _breaks_header(head[1:]) else None
    return _parsed(text[pos:at], bare, at + len(MESSAGE))


def _may_open(head: str, bare: bool) -> bool:
    """Whether a header may begin `head` (or `head` is the beginning of one)."""
    openings = (START, CHANNEL, " to=", "to=") if bare else (START,)
    return any(head.startswith(o) or o.startswith(head) for o in openings)


def _breaks_header(head: str) -> bool:
    """Whether `head` holds a marker no header holds past its start (a terminator, a start)."""
    return any(t in head for t in (*TERMINATORS, START))


def _parsed(head: str, bare: bool, body_at: int) -> Header | None:
    if head.startswith(START):
        head = head[len(START) :]
        role = head.split(CHANNEL, 1)[0].split(" ", 1)[0]
        if not role or "<|" in role:
            return None
        head = head[len(role) :]
    elif not bare:
        return None
    if head.count(CHANNEL) != 1 or _breaks_header(head):
        return None
    before, after = head.split(CHANNEL)
    words = after.replace(CONSTRAIN, " ").split()
    if not words or words[0] not in CHANNELS or "<|" in after.replace(CONSTRAIN, ""):
        return None
    # The recipient stands before the channel or after it; the body's type after it.
    if not all(word.startswith("to=") for word in before.split()):
        return None
    recipients = [w[len("to=") :] for w in [*before.split(), *words[1:]] if w.startswith("to=")]
    if len(recipients) > 1:
        return None
    recipient = recipients[0] if recipients and recipients[0] != "assistant" else None
    return Header(words[0], recipient, body_at)


@dataclass(frozen=True)
class BodyEnd:
    # Where the body ends (the marker's position), and where the next message begins.
    at: int
    next_at: int
    # The body ended with a marker no body holds (a header's): the markup broke there.
    broken: bool = False


def body_end(text: str, pos: int) -> BodyEnd | None:
    """Where the body that runs on at text[pos] ends: at a terminator, or where the next message starts
    with its terminator left out; None while no marker has come."""
    at = text.find("<|", pos)
    while at >= 0:
        marker = next((m for m in MARKERS if text.startswith(m, at)), None)
        if marker in TERMINATORS:
            return BodyEnd(at, at + len(marker))
        if marker == START:
            return BodyEnd(at, at)
        if marker is not None:
            return BodyEnd(at, at, broken=True)
        at = text.find("<|", at + 1)
    return None


def call_header(name: str) -> str:
    """A call's header as the reasoning parser hands calls on to the tool parser (and as gpt-oss
    writes it on the commentary channel)."""
    return f"{CHANNEL}commentary to={FUNCTIONS}{name} {CONSTRAIN}json{MESSAGE}"


def harmony_history(messages: Sequence[dict[str, Any]], chat_template: str | None) -> list[dict[str, Any]]:
    """History for a harmony template (gpt-oss's), as it reads one: the instructions in one message,
    an assistant message's thinking as `thinking`, and one call a message."""
    if not is_harmony_template(chat_template):
        return list(messages)
    return _one_call_a_message([_with_thinking(message) for message in _instructions_joined(messages)])


def _instructions_joined(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading system (and developer) messages as one: the template renders the first alone as its
    developer message and drops the others (a Responses request's `instructions` and the developer
    items of its input, as Codex sends them)."""
    count = 0
    while count < len(messages) and messages[count].get("role") == "system":
        count += 1
    if count < 2:
        return list(messages)
    joined = "\n\n".join(message["content"] for message in messages[:count] if message["content"])
    return [{**messages[0], "content": joined}, *messages[count:]]


def _with_thinking(message: dict[str, Any]) -> dict[str, Any]:
    """The reasoning_content given as `thinking`. A message with calls carries one analysis text in the
    template (its content is rendered as one, and it refuses both): the thinking, where there is one."""
    thinking = message.get("reasoning_content")
    if message.get("role") != "assistant" or thinking is None:
        return message
    message = {**message, "thinking": thinking}
    if message.get("tool_calls"):
        message["content"] = ""
    return message


def _one_call_a_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gpt-oss makes one call a turn, and its template renders an assistant message's first call alone
    (and names the outputs after it by that call): a message of several calls (parallel ones, another
    model's) becomes a message a call, each followed by its output."""
    laid_out: list[dict[str, Any]] = []
    at = 0
    while at < len(messages):
        message, at = messages[at], at + 1
        calls = message.get("tool_calls") or []
        if message.get("role") != "assistant" or len(calls) < 2:
            laid_out.append(message)
            continue
        outputs = []
        while at < len(messages) and messages[at].get("role") == "tool":
            outputs.append(messages[at])
            at += 1
        laid_out += _calls_with_their_outputs(message, calls, outputs)
    return laid_out


def _calls_with_their_outputs(
    message: dict[str, Any], calls: list[dict[str, Any]], outputs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each call in a message of its own (the first keeps the message's thinking and text), then the
    outputs that answer it; outputs that answer none of them last, as they came."""
    laid_out: list[dict[str, Any]] = []
    unanswered = list(outputs)
    for n, call in enumerate(calls):
        laid_out.append({**message, "tool_calls": [call]} if n == 0 else _call_alone(call))
        answers = [output for output in unanswered if output.get("tool_call_id") == call.get("id")]
        laid_out += answers
        unanswered = [output for output in unanswered if output not in answers]
    return laid_out + unanswered


def _call_alone(call: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def harmony_tools(
    tools: list[dict[str, Any]] | None, chat_template: str | None
) -> list[dict[str, Any]] | None:
    """Tools for a harmony template, which adds each function's description to a string (gpt-oss's
    writes it as a `//` comment): a function without one (null, or left out, as the Responses API and
    chat allow) has an empty one, where the template would fail the request."""
    if tools is None or not is_harmony_template(chat_template):
        return tools
    return [_described(tool) for tool in tools]


def _described(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, dict) or isinstance(function.get("description"), str):
        return tool
    return {**tool, "function": {**function, "description": ""}}
