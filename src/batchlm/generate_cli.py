"""`batchlm generate`: offline generation for prompts given on the command line or in a file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from batchlm.flags import (
    Bounds,
    add_engine_arguments,
    bounded_number,
    dataclass_from_args,
    engine_flag_conflicts,
    non_empty_text,
)
from batchlm.logging_setup import LOG_LEVELS, configure_logging
from batchlm.sampling_params import MAX_N, SamplingParams, SamplingParamsError
from batchlm.stop_signals import StopsAsInterrupts

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("prompts and output")
    io.add_argument("prompts", nargs="*", help="prompts to complete (one request each)")
    io.add_argument(
        "--prompts-file",
        type=non_empty_text,
        help="a file with one prompt per line ('-' reads standard input)",
    )
    io.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the chat template"
    )
    io.add_argument("--json", action="store_true", help="print one JSON object per request instead of text")
    sampling = parser.add_argument_group("sampling")
    # The ranges SamplingParams takes, checked as the command line is parsed (a usage error naming the
    # flag, before the model loads) and stated in --help.
    sampling.add_argument(
        "--max-tokens",
        type=bounded_number(int, Bounds(minimum=1)),
        default=64,
        help="new tokens per completion (default: 64; at least 1)",
    )
    model_default = "default: the model's recommended value (--generation-config), else %s"
    sampling.add_argument(
        "--temperature",
        type=bounded_number(float, Bounds(minimum=0, maximum=100)),
        default=None,
        help="0 = greedy (" + model_default % "0, greedy; from 0 to 100)",
    )
    sampling.add_argument(
        "--top-p",
        type=bounded_number(float, Bounds(above=0, maximum=1)),
        default=None,
        help="(" + model_default % "1; above 0 and at most 1)",
    )
    sampling.add_argument(
        "--top-k",
        type=bounded_number(int, Bounds(minimum=-1)),
        default=None,
        help="-1 or 0 = off (" + model_default % "0; at least -1)",
    )
    sampling.add_argument(
        "--n",
        type=bounded_number(int, Bounds(minimum=1, maximum=MAX_N)),
        default=1,
        help=f"completions per prompt (default: 1; from 1 to {MAX_N})",
    )
    sampling.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    sampling.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    sampling.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    parser.add_argument(
        "--log-level", default="WARNING", choices=list(LOG_LEVELS), help="log level (default: WARNING)"
    )
    add_engine_arguments(parser)


def check_args(args: argparse.Namespace) -> str | None:
    """A combination of flags in which one would be ignored, or None."""
    if args.chat_template is not None and not args.chat:
        return "--chat-template formats --chat prompts; without --chat prompts are completed as given"
    return engine_flag_conflicts(args)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file == "-":
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    elif args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            prompts += [line.rstrip("\n") for line in handle if line.strip()]
    return prompts


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    try:
        prompts = _read_prompts(args)
    except (OSError, UnicodeDecodeError) as error:
        print(f"batchlm generate: cannot read --prompts-file {args.prompts_file}: {error}", file=sys.stderr)
        return 2
    if not prompts:
        print(
            "batchlm generate: no prompts given (pass them as arguments or with --prompts-file)",
            file=sys.stderr,
        )
        return 2
    # The fields given here; the model's recommendations fill the others once it has loaded.
    given = {
        name: value
        for name, value in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
        if value is not None
    }
    try:
        params = SamplingParams(
            n=args.n,
            temperature=given.get("temperature", 0.0),
            top_p=given.get("top_p", 1.0),
            top_k=given.get("top_k", 0),
            max_tokens=args.max_tokens,
            stop=args.stop,
            seed=args.sampling_seed,
            ignore_eos=args.ignore_eos,
        )
    except SamplingParamsError as error:
        print(f"batchlm generate: {error}", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP end it as Ctrl-C does: their default action left the tensor-parallel
    # workers' semaphores to multiprocessing's resource tracker, which warned of leaks.
    with StopsAsInterrupts() as stop:
        try:
            return _load_and_generate(args, prompts, params, given)
        except KeyboardInterrupt:  # Ctrl-C while the model downloads, loads or generates
            print(f"batchlm generate: {stop.describe()}", file=sys.stderr)
            return stop.exit_code


def _load_and_generate(
    args: argparse.Namespace, prompts: list[str], params: SamplingParams, given: dict[str, float]
) -> int:
    from batchlm.config import EngineConfig
    from batchlm.engine.llm import LLM

    config = dataclass_from_args(EngineConfig, args)
    # A model that cannot load and a prompt the model cannot take (too long for its context, a chat
    # template that fails) are the user's to fix: one line saying why, not a traceback; so is a
    # cache directory that cannot be written.
    try:
        llm = LLM(**config.__dict__)
    except ValueError as error:
        print(f"batchlm generate: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"batchlm generate: {error}", file=sys.stderr)
        return 1
    recommended = llm.sampling_defaults.given()
    params = params.clone(**{name: value for name, value in recommended.items() if name not in given})
    started = time.perf_counter()
    try:
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
    except ValueError as error:
        print(f"batchlm generate: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    for prompt, output in zip(prompts, outputs, strict=True):
        _print_output(prompt, output, as_json=args.json)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"# {len(outputs)} requests, {generated} tokens in {elapsed:.2f} s", file=sys.stderr)
    return 0


def _print_output(prompt: str, output: object, as_json: bool) -> None:
    from batchlm.outputs import RequestOutput

    assert isinstance(output, RequestOutput)
    if as_json:
        record = {
            "prompt": prompt,
            "completions": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                for c in output.outputs
            ],
        }
        print(json.dumps(record, ensure_ascii=False))
        return
    for completion in output.outputs:
        print(f"=== {prompt!r} [{completion.finish_reason}]")
        print(completion.text)
