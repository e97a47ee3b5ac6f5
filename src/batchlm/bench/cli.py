"""`batchlm bench`: the command-line flags, and the entry point that runs a benchmark and reports it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

from batchlm.bench import config as cfg
from batchlm.bench.datasets import DATASET_ALIASES, DATASET_NAMES

EPILOG = """\
Without flags this behaves like the seed client: 4 simulated users, 20 requests in all, each user
thinking 0.1-2.0 s before every request and asking for a random max_tokens in 10-512.
Metric definitions (all per successful request; failures are reported apart):
  TTFT   first generated text received - request sent (streaming only)
  TPOT   (latency - TTFT) / (output tokens - 1)
  ITL    per token: each gap between chunks divided by the tokens in the later chunk;
         chunk ITL (vLLM's "ITL"): the gaps between chunks themselves
  E2EL   response complete - request sent (the seed's "latency")
  Throughput (TPS) = output tokens of successful requests / total duration
  Goodput (--goodput) = successful requests meeting every objective / total duration
See BENCHMARKS.md, section "Benchmark client", for the full definitions."""


def add_seed_arguments(parser: argparse.ArgumentParser, seed_only: bool = False) -> None:
    """The seed benchmark_client.py's flags, with its names and defaults. `seed_only` leaves out what
    `batchlm bench` adds to them (the --num-prompts alias and comma lists for sweeps)."""
    parser.add_argument(
        "--base-url",
        default="http://localhost:8080/v1",
        help="API base URL; an endpoint's URL (ending in /chat/completions, /completions or /responses) "
        "is cut back to it (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key", default="EMPTY", help="API key sent as a Bearer token (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="default_model",
        help="model name; 'auto' asks the server's /v1/models (default: %(default)s)",
    )
    if seed_only:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=None,
            help=f"simulated users (default: {cfg.SEED_CONCURRENCY}; at least 1)",
        )
    else:
        parser.add_argument(
            "--concurrency",
            default=None,
            metavar="N[,N...]",
            help=f"closed-loop simulated users, each at least 1; a list (1,4,16) sweeps (default: {cfg.SEED_CONCURRENCY})",
        )
    parser.add_argument(
        "--requests",
        *([] if seed_only else ["--num-prompts"]),
        dest="requests",
        type=int,
        default=None,
        help=f"requests to send (default: {cfg.SEED_REQUESTS}; at least 1)"
        if seed_only
        else f"requests to send, at least 1 (default: {cfg.SEED_REQUESTS}; with --duration: size of the "
        f"prompt pool, default {cfg.DURATION_POOL_SIZE})",
    )
    parser.add_argument("--stream", action="store_true", help="stream responses (needed for TTFT and ITL)")
    parser.add_argument(
        "--min-delay",
        type=float,
        default=None,
        help=f"min think time before each request, s (default: {cfg.SEED_MIN_DELAY}; at least 0)",
    )
    parser.add_argument(
        "--max-delay",
        type=float,
        default=None,
        help=f"max think time before each request, s (default: {cfg.SEED_MAX_DELAY}; at least --min-delay)",
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        help=f"min of the random max_tokens (default: {cfg.SEED_MIN_TOKENS}; at least 1)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"max of the random max_tokens (default: {cfg.SEED_MAX_TOKENS}; at least --min-tokens)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """All `batchlm bench` flags: the seed's, then vLLM `bench serve` names for the rest."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_seed_arguments(parser)
    _add_load_arguments(parser.add_argument_group("load"))
    _add_prompt_arguments(parser.add_argument_group("prompts and lengths"))
    _add_api_arguments(parser.add_argument_group("API"))
    _add_output_arguments(parser.add_argument_group("output"))


def _add_load_arguments(load: argparse._ArgumentGroup) -> None:
    load.add_argument(
        "--request-rate",
        default=None,
        metavar="RATE[,RATE...]",
        help="open loop: mean requests/s, above 0 (Poisson, or gamma with --burstiness); 'inf' = all at once",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=None,
        help="gamma shape of inter-arrival times, above 0: 1 Poisson (default), <1 bursty, >1 regular "
        "('inf': evenly spaced)",
    )
    load.add_argument(
        "--max-concurrency",
        default=None,
        metavar="N[,N...]",
        help="open loop: most requests in flight, at least 1 (alone it means --request-rate inf)",
    )
    load.add_argument(
        "--duration",
        type=float,
        default=None,
        help="run for this many seconds (above 0, finite) instead of --requests",
    )
    load.add_argument(
        "--num-warmups",
        type=int,
        default=0,
        help="requests sent and discarded before measuring (default: 0; at least 0)",
    )
    load.add_argument(
        "--seed", type=int, default=0, help="seeds prompts, max_tokens, think and arrival times (default: 0)"
    )
    load.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds before a request fails (above 0, finite; default: 600); the first request, "
        "GET {base-url}/models, waits at most 30 s",
    )
    load.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="send each load level from this many processes, at most one per request it has in flight "
        "(each every N-th request and 1/N of the load), for servers that stream faster than one client event loop reads (see the self-check); "
        "no progress line then (default: 1; at least 1)",
    )
    load.add_argument(
        "--no-warm-connections",
        action="store_true",
        help="do not open each level's connections before it starts; by default as many GETs of "
        "{base-url}/models as the level can have requests in flight (at most one per request, 256 "
        "without a limit) open kept-alive connections first, so that a burst measures the server and "
        "not the client's own TCP connects",
    )


def _add_prompt_arguments(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--dataset-name",
        default=None,
        choices=[*DATASET_NAMES, *DATASET_ALIASES],
        help="builtin (default), random (default with --input-len), jsonl (alias custom), sharegpt; "
        "editing (rewrite generated code with a name changed) and summarization (of a generated article) "
        "need no files",
    )
    data.add_argument("--dataset-path", default=None, help="file for the jsonl and sharegpt datasets (only)")
    data.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=int,
        default=None,
        help="random prompts of exactly this many tokens, at least 1 (counted by the server's /tokenize)",
    )
    data.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=None,
        help="fixed max_tokens for every request, at least 1, sent with ignore_eos so runs compare",
    )
    data.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos=true (implied by --output-len)"
    )
    data.add_argument(
        "--prompt-repeat",
        type=int,
        default=100,
        help="times each built-in prompt is repeated, as the seed did (default: %(default)s; at least 1)",
    )


def _add_api_arguments(api: argparse._ArgumentGroup) -> None:
    api.add_argument(
        "--backend",
        default="openai-chat",
        choices=["openai-chat", "openai", "openai-responses"],
        help="openai-chat: /chat/completions (default); openai: /completions; openai-responses: /responses",
    )
    api.add_argument(
        "--endpoint", default=None, help="path after --base-url, starting with '/' (default: from --backend)"
    )
    api.add_argument(
        "--no-include-usage",
        action="store_true",
        help="do not ask for stream_options.include_usage; count output tokens with the server's "
        "/tokenize instead, or one per chunk without it",
    )
    api.add_argument("--header", nargs="*", metavar="KEY=VALUE", help="extra HTTP headers")
    api.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    api.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature, at least 0 (server default if unset)",
    )
    api.add_argument(
        "--top-p", type=float, default=None, help="top-p, above 0 and at most 1 (server default if unset)"
    )
    api.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="top-k, at least -1; -1 and 0 are off (server default if unset)",
    )


def _add_output_arguments(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--metric-percentiles",
        default="50,90,99",
        help="percentiles to report, each from 0 to 100 (default: %(default)s)",
    )
    out.add_argument(
        "--goodput",
        nargs="+",
        action="extend",
        default=None,
        metavar="KEY:VALUE",
        help="report request goodput: successful requests per second meeting every objective given, in "
        "ms, each key at most once: ttft, tpot (both need --stream), e2el; e.g. --goodput ttft:500 tpot:50 "
        "(saved as request_goodput, and the objectives as goodput)",
    )
    out.add_argument(
        "--save-result", default=None, metavar="FILE.json", help="write results as JSON (vLLM keys)"
    )
    out.add_argument(
        "--save-detailed",
        action="store_true",
        help="also save per-request lists (ttfts, itls, ...) in --save-result",
    )
    out.add_argument(
        "--metadata", nargs="*", metavar="KEY=VALUE", help="extra key=value pairs for the --save-result JSON"
    )
    out.add_argument(
        "--plot", default=None, metavar="FILE.png", help="latency distributions and throughput chart"
    )
    out.add_argument("--disable-tqdm", action="store_true", help="no progress line")


def _run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """On uvloop where it is installed (a dependency but on Windows): a client reading hundreds of
    streams spends less CPU per event on it, so it holds the measured server back less."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: int = uvloop.run(main)
    return result


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; returns 0 when at least one request succeeded, 1 when none did, 2 on bad flags
    or a failed set-up, 130 when interrupted."""
    try:
        config = cfg.from_args(args)
    except ValueError as exc:
        print(f"batchlm bench: error: {exc}", file=sys.stderr)
        return 2
    from batchlm.bench.runner import main_async

    try:
        return _run_event_loop(main_async(config))
    except KeyboardInterrupt:
        print("\nbatchlm bench: interrupted before a load level finished; nothing to report", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="batchlm bench", description="Benchmark any OpenAI-compatible server."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
