"""Input-grounded prompts, generated locally and deterministically: code to rewrite with a name changed
(the answer repeats most of the prompt) and articles to summarize (the answer reuses its phrases). They
show what speculative decoding from the prompt's own n-grams gains."""

from __future__ import annotations

import random

_NAMES = ("total", "count", "items", "result", "offset", "buffer", "values", "limit", "index", "record")
_NEW_NAMES = (
    "amount",
    "tally",
    "entries",
    "outcome",
    "shift",
    "storage",
    "numbers",
    "ceiling",
    "cursor",
    "row",
)
_FUNCTIONS = ("load", "merge", "parse", "render", "scale", "filter", "collect", "update")
_NOUNS = ("orders", "users", "events", "readings", "invoices", "messages", "samples", "tickets")

_TOPICS = (
    ("the river town", "flood barriers", "the council", "spring rains"),
    ("the orchard", "a new irrigation plan", "the growers", "a dry summer"),
    ("the library", "late opening hours", "the readers", "the exam season"),
    ("the harbour", "electric ferries", "the port authority", "rising fuel costs"),
    ("the mountain school", "a solar roof", "the parents", "long winters"),
    ("the market square", "a weekly night market", "the traders", "quiet evenings"),
)


def editing_prompt(rng: random.Random) -> str:
    """A request to rename one variable in a generated Python module; the reply is that module again."""
    old = rng.choice(_NAMES)
    new = _NEW_NAMES[_NAMES.index(old)]
    functions = [_python_function(rng, old, rng.choice(_FUNCTIONS), rng.choice(_NOUNS)) for _ in range(2)]
    code = "\n\n".join(functions)
    return (
        f"Rewrite the following Python code with the variable `{old}` renamed to `{new}`. "
        f"Change nothing else and reply with the complete code only.\n\n```python\n{code}\n```"
    )


def _python_function(rng: random.Random, var: str, verb: str, noun: str) -> str:
    step = rng.randint(2, 9)
    return "\n".join(
        (
            f"def {verb}_{noun}(source, {var}=0):",
            f'    """{verb.capitalize()} the {noun} from source, starting at {var}."""',
            f"    {var} = max({var}, 0)",
            "    output = []",
            "    for position, entry in enumerate(source):",
            f"        if position < {var}:",
            "            continue",
            f"        if entry is None or position % {step} == 0:",
            f"            {var} += 1",
            "            continue",
            f"        output.append((position, entry, {var}))",
            f"    return output, {var}",
        )
    )


def summarization_prompt(rng: random.Random) -> str:
    """A generated news article and a request for a summary in its own words."""
    place, project, group, cause = rng.choice(_TOPICS)
    year = rng.randint(2015, 2025)
    cost = rng.randint(2, 40)
    sentences = [
        f"In {year}, {group} of {place} approved {project} after {cause} had caused trouble for years.",
        f"The plan for {project} will cost about {cost} million and is paid for by {group} and the region.",
        f"According to {group}, {project} should be finished within {rng.randint(2, 6)} years.",
        f"Critics said that {project} was too expensive, but {group} argued that {cause} would cost more.",
        f"During the public meeting in {place}, many residents asked how {project} would change daily life.",
        f"The answer from {group} was that {project} would make {place} safer and cheaper to live in.",
        f"Work on {project} begins next month, and {group} will publish a report on it every season.",
    ]
    article = " ".join(sentences[i % len(sentences)] for i in range(rng.randint(7, 10)))
    return (
        "Summarize the following article in four sentences, keeping its key phrases and numbers.\n\n"
        f"Article: {article}\n\nSummary:"
    )


def grounded_prompts(kind: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of one kind ("editing" or "summarization"), the same for a given seed."""
    make = {"editing": editing_prompt, "summarization": summarization_prompt}[kind]
    rng = random.Random(f"{kind}:{seed}")
    return [make(rng) for _ in range(count)]
