"""What a reasoning model's stream costs the API server a delta while the model thinks at length: the
thinking split from the answer as it arrives, fed in deltas of a few characters, as the server feeds
a stream.

    python benchmarks/reasoning_stream_cost.py [--chars 10000 50000 200000] [--delta 4] [--repeats 3]   (no GPU)

Prints, per length of thinking, microseconds a delta (the median of the repeats) over the whole output."""

from __future__ import annotations

import argparse
import json
import statistics

from tool_stream_cost import us_a_delta

from batchlm.reasoning.split import ReasoningParser, ThinkMarkers

SENTENCE = "Let me consider the next step carefully. "


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--chars", type=int, nargs="+", default=[10_000, 50_000, 200_000], help="thinking length"
    )
    parser.add_argument("--delta", type=int, default=4, help="characters a delta (about a token)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for chars in args.chars:
        text = "<think>\n" + SENTENCE * max(1, chars // len(SENTENCE)) + "\n</think>\n\nThe answer is 42."
        make_stream = ReasoningParser(ThinkMarkers("<think>", "</think>")).stream
        runs = [us_a_delta(make_stream, text, args.delta) for _ in range(args.repeats)]
        print(json.dumps({"thinking_chars": chars, "us_a_delta": round(statistics.median(runs), 1)}))


if __name__ == "__main__":
    main()
