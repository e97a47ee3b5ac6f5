#!/usr/bin/env python3
"""The seed's benchmark client command line, run by `batchlm bench` (which takes many more flags).

    python benchmark_client.py --concurrency 8 --requests 50 --stream --model my-model

Accepts exactly the seed client's flags (--base-url, --api-key, --model, --concurrency, --requests,
--stream, --min-delay, --max-delay, --min-tokens, --max-tokens) with the same defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from batchlm.bench import cli
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from batchlm.bench import cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    seed_parser = argparse.ArgumentParser(
        description="Benchmark an OpenAI-compatible server (seed interface)."
    )
    cli.add_seed_arguments(seed_parser, seed_only=True)
    seed_parser.parse_args(argv)  # rejects any flag the seed client did not have
    full_parser = argparse.ArgumentParser(prog="benchmark_client.py")
    cli.add_arguments(full_parser)
    return cli.run(full_parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
