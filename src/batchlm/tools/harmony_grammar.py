"""gpt-oss's grammars (llguidance's Lark) in harmony markup (tools/harmony.py). They hold the whole
output, its thinking included, since the thinking is a message like the answer: the prompt ends with
`<|start|>assistant`, and the output is a run of messages, each after the first opening with
`<|start|>assistant` again. First any number of analysis messages (the thinking) and, where the output
may hold text, of recipient-less commentary ones (preambles), each ended by `<|end|>`; then either the
final message, whose body is free text or the client's answer and which the generation's end closes,
or one call: its header, `<|message|>`, the arguments' JSON and `<|call|>` (a stop token, so a call is
the output's last message). The header is read either way gpt-oss writes one: the recipient after the
channel (`<|channel|>commentary to=functions.NAME <|constrain|>json`, its own output) or before it
(` to=functions.NAME<|channel|>commentary json`, as its chat template renders calls in history).

The markers are named by their token ids; no body may spell one out (the parsers read the text, where
a spelled-out marker reads as the token)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from batchlm.tools.call_grammar import arguments_json, free_text, token_rule
from batchlm.tools.function_tool import FunctionTool
from batchlm.tools.harmony import CALL, CHANNEL, CONSTRAIN, END, FUNCTIONS, MARKERS, MESSAGE, START


def harmony_grammar(
    tools: Sequence[FunctionTool], added_tokens: Mapping[str, int], answer: str | None, forced: bool
) -> str:
    """The output's grammar. answer: a Lark rule body the final message's body is instead of free text
    (the client's response_format). forced: the output ends in a call (a forced tool_choice), its
    arguments laid out as the chat template renders them; before it the thinking alone."""
    mark = _Markers(added_tokens)
    # Preambles are content: none beside a forced call, nor beside an answer the content must be.
    notes = ["analysis"] if forced or answer is not None else ["analysis", "commentary"]
    note = " | ".join(f'{mark.channel} "{channel}" {mark.message} free {mark.end}' for channel in notes)
    rules = [
        f"start: (note next)* {'call' if forced else '(final | call)'}",
        f"note: {note}",
        f'next: {mark.start} "assistant"',
        *_call_rules(tools, mark, forced),
        *free_text(added_tokens, MARKERS, unspelled=MARKERS),
    ]
    if not forced:
        rules.append(f'final: {mark.channel} "final" {mark.message} {"free" if answer is None else "answer"}')
    if answer is not None:
        rules.append(f"answer: {answer}")
    return "\n".join(rules)


class _Markers:
    """The markers as Lark references: their tokens by id (a tokenizer without them: their text)."""

    def __init__(self, added_tokens: Mapping[str, int]) -> None:
        def marker(text: str) -> str:
            return token_rule(text, added_tokens) or json.dumps(text)

        self.start, self.channel, self.message = marker(START), marker(CHANNEL), marker(MESSAGE)
        self.constrain, self.end, self.call = marker(CONSTRAIN), marker(END), marker(CALL)


def _call_rules(tools: Sequence[FunctionTool], mark: _Markers, forced: bool) -> list[str]:
    """`call`: one call of any of `tools`, its header read either way, its arguments their JSON."""
    calls, rules = [], []
    for i, tool in enumerate(tools):
        recipient = f"to={FUNCTIONS}{tool.name}"
        recipient_first = f'{json.dumps(" " + recipient)} {mark.channel} "commentary"'
        channel_first = f"{mark.channel} {json.dumps('commentary ' + recipient)}"
        calls.append(f"call_{i}")
        rules += [
            f"call_{i}: ({recipient_first} | {channel_first}) body_type? {mark.message} arguments_{i} {mark.call}",
            f"arguments_{i}: {arguments_json(tool, forced)}",
        ]
    # The body's type, `<|constrain|>json` as gpt-oss writes it or `json` as its template does.
    body_type = f'body_type: " json" | " "? {mark.constrain} "json"'
    return [f"call: {' | '.join(calls)}", *rules, body_type]
