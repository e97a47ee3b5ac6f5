"""The `batchlm` command: `serve`, `generate`, `bench` and `run-batch` subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# Each subcommand module exposes add_arguments(parser) and run(args) -> int, and may expose
# check_args(args) -> str | None, what is wrong with a combination of flags (a usage error); imported
# lazily so `batchlm bench` never imports torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("batchlm.server.cli", "Start the OpenAI-compatible server."),
    "generate": (
        "batchlm.generate_cli",
        "Generate completions offline for prompts given on the command line or in a file.",
    ),
    "bench": ("batchlm.bench.cli", "Benchmark any OpenAI-compatible server over HTTP."),
    "run-batch": (
        "batchlm.run_batch",
        "Run a file of requests in OpenAI's Batch API format (JSONL) against a model, offline.",
    ),
}


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose usage errors take one line: `serve`'s full usage runs to dozens of
    lines and would bury the message (`--help` still prints it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load(
    module_name: str,
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    import importlib

    module = importlib.import_module(module_name)
    return module.add_arguments, module.run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="batchlm",
        description="batchlm: continuous-batching LLM inference with an OpenAI-compatible API.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(
        dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", parser_class=SubcommandParser
    )
    chosen = next((a for a in argv if not a.startswith("-")), None)
    sub_parsers: dict[str, argparse.ArgumentParser] = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            add_arguments, _ = _load(module_name)
            add_arguments(sub_parsers[name])
    args = parser.parse_args(argv)
    if args.version:
        from batchlm import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _, run = _load(SUBCOMMANDS[args.command][0])
    problem = _check(SUBCOMMANDS[args.command][0], args)
    if problem is not None:
        sub_parsers[args.command].error(problem)
    return int(run(args) or 0)


def _check(module_name: str, args: argparse.Namespace) -> str | None:
    import importlib

    check = getattr(importlib.import_module(module_name), "check_args", None)
    return None if check is None else check(args)


if __name__ == "__main__":
    sys.exit(main())
