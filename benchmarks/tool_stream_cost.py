"""What a tool-call stream costs the API server a delta while a model writes a long call: one output per
parser family, fed in deltas of a few characters, as the server feeds a stream. `--shape file`: a file
through a tool (one long string; Qwen3-Coder's a raw parameter value); `--shape rows`: rows of short keys,
strings, numbers and literals; `--shape text`: no call, a long answer (code with tags in it) with tools
enabled.

    python benchmarks/tool_stream_cost.py [--shape file|rows|text] [--chars 25000] [--delta 4] [--repeats 3]
        [--family qwen3_coder]   (no GPU)

Prints, per family, microseconds a delta (the median of the repeats) over the whole output."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

from batchlm.tools.hermes import HermesParser
from batchlm.tools.llama3_json import Llama3JsonParser
from batchlm.tools.mistral import MistralParser
from batchlm.tools.parser import ToolParser
from batchlm.tools.qwen3_coder import Qwen3CoderParser


class Stream(Protocol):
    def feed(self, delta: str) -> Any: ...

    def finish(self) -> Any: ...


LINE = 'def double(x):\n    return x * 2  # "twice" <b>\n'
FAMILIES = ("hermes", "llama3_json", "mistral", "qwen3_coder")


def rows(chars: int) -> str:
    """Records of about `chars` characters in all, as a model saving a table through a tool writes them."""
    row = {"id": 0, "name": "item0", "tags": ["a", "b"], "price": 12.5, "ok": True, "note": None}
    count = max(1, chars // (len(json.dumps(row)) + 2))
    return json.dumps([{**row, "id": i, "name": f"item{i}"} for i in range(count)])


def outputs(chars: int, shape: str = "file") -> dict[str, tuple[ToolParser, str]]:
    code = LINE * max(1, chars // len(LINE))
    arguments = json.dumps({"path": "a.py", "content": code})
    if shape == "text":
        answer = f"Here is the file:\n\n{code}\nRun it with `python a.py`."
        parsers = (HermesParser(), Llama3JsonParser(), MistralParser(), Qwen3CoderParser())
        return {name: (parser, answer) for name, parser in zip(FAMILIES, parsers, strict=True)}
    if shape == "rows":
        code = rows(chars)
        arguments = f'{{"table": "items", "rows": {code}}}'
    return {
        "hermes": (
            HermesParser(),
            f'Sure. <tool_call>\n{{"name": "write", "arguments": {arguments}}}\n</tool_call>',
        ),
        "llama3_json": (Llama3JsonParser(), f'{{"name": "write", "parameters": {arguments}}}'),
        "mistral": (MistralParser(), f"[TOOL_CALLS]write[ARGS]{arguments}"),
        "qwen3_coder": (
            Qwen3CoderParser(),
            "<tool_call>\n<function=write>\n<parameter=path>\na.py\n</parameter>\n"
            f"<parameter=content>\n{code}</parameter>\n</function>\n</tool_call>",
        ),
    }


def us_a_delta(make_stream: Callable[[], Stream], text: str, delta: int) -> float:
    """Microseconds a delta of a new stream fed `text` in pieces of `delta` characters, finish included."""
    pieces = [text[i : i + delta] for i in range(0, len(text), delta)]
    stream = make_stream()
    start = time.perf_counter()
    for piece in pieces:
        stream.feed(piece)
    stream.finish()
    return (time.perf_counter() - start) * 1e6 / len(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", choices=("file", "rows", "text"), default="file", help="what the output holds"
    )
    parser.add_argument("--family", choices=FAMILIES, action="append", help="only these (default: all)")
    parser.add_argument("--chars", type=int, default=25_000, help="length of the call's file content or rows")
    parser.add_argument("--delta", type=int, default=4, help="characters a delta (about a token)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for family, (tool_parser, text) in outputs(args.chars, args.shape).items():
        if args.family and family not in args.family:
            continue
        runs = [us_a_delta(tool_parser.stream, text, args.delta) for _ in range(args.repeats)]
        print(
            json.dumps(
                {"family": family, "chars": len(text), "us_a_delta": round(statistics.median(runs), 1)}
            )
        )


if __name__ == "__main__":
    main()
