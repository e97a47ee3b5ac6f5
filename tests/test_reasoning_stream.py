"""A reasoning stream that reads each delta alone, held to the split of the whole output at every delta:
the same pieces, delta by delta, over generated outputs split anywhere."""

from __future__ import annotations

import random

import pytest

from batchlm.reasoning.split import ReasoningDelta, ReasoningParser, ThinkMarkers

THINK = ThinkMarkers("<think>", "</think>")
MISTRAL = ThinkMarkers("[THINK]", "[/THINK]", special=True)
SEED = ThinkMarkers("<seed:think>", "</seed:think>", prompt_tags=("<seed:cot_budget_reflect>",))
# The hard parts: blanks of every kind (Unicode's too), markers and their beginnings, text that looks
# like them, and what a model writes around them.
PIECES = [
    " ",
    "\n",
    "\n\n",
    "\t",
    "\u00a0",
    "\u2003",
    "a",
    "Hm.",
    "x < y",
    "é",
    "😀",
    "<",
    "</",
    "</thi",
    "</think",
]
PIECES += ["<think>", "</think>", "</thinking>", "<thin", "[THINK]", "[/THINK]", "[/THI", "[", "]", ">"]
PIECES += ["<seed:think>", "</seed:think>", "</seed:thi", "<seed:", "</seed", "</seed:cot_budget_reflect>"]


def reference(parser: ReasoningParser, pieces: list[str]) -> list[ReasoningDelta]:
    """The stream as a difference of whole splits at every delta."""
    text, sent_reasoning, sent_content, out = "", 0, 0, []
    for piece in [*pieces, None]:
        if piece is not None:
            text += piece
        split = parser.split(text, final=piece is None)
        reasoning = split.reasoning or ""
        out.append(ReasoningDelta(reasoning[sent_reasoning:], split.content[sent_content:]))
        sent_reasoning = max(sent_reasoning, len(reasoning))
        sent_content = max(sent_content, len(split.content))
    return out


def streamed(parser: ReasoningParser, pieces: list[str]) -> list[ReasoningDelta]:
    stream = parser.stream()
    return [stream.feed(piece) for piece in pieces] + [stream.finish()]


def output(rng: random.Random, markers: ThinkMarkers, opened: bool) -> str:
    words = lambda n: "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))  # noqa: E731
    start = "" if opened else rng.choice(["", " ", "\n", "\n\n "]) + markers.start * (rng.random() < 0.85)
    end = markers.end * (rng.random() < 0.8)
    return start + words(30) + end + words(15)


@pytest.mark.parametrize("markers", [THINK, MISTRAL, SEED], ids=["think", "mistral", "seed_oss"])
@pytest.mark.parametrize("opened", [False, True])
def test_a_stream_sends_what_whole_splits_send_delta_by_delta(markers: ThinkMarkers, opened: bool) -> None:
    rng = random.Random(4)
    parser = ReasoningParser(markers, opened_by_prompt=opened)
    for _ in range(3_000):
        text = output(rng, markers, opened)
        cut = rng.randint(0, len(text)) if rng.random() < 0.2 else len(text)
        text, pieces, pos = text[:cut], [], 0
        while pos < len(text):
            size = rng.choice([0, 1, 1, 2, 3, 8])  # an empty delta now and then, as a stop string leaves
            pieces.append(text[pos : pos + size])
            pos += size
        assert streamed(parser, pieces) == reference(parser, pieces), (text, pieces)
