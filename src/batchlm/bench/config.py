"""The resolved settings of one `batchlm bench` invocation, validated from the parsed command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchlm.bench.datasets import DATASET_ALIASES, DATASET_NAMES
from batchlm.bench.goodput import parse_goodput
from batchlm.bench.loadgen import LoadConfig
from batchlm.bench.openai_format import API_PATHS, BACKENDS, Api
from batchlm.bench.workload import WorkloadConfig

# The seed client's defaults for flags whose CLI default is None (None lets us see what was typed).
SEED_CONCURRENCY = 4
SEED_REQUESTS = 20
SEED_MIN_DELAY = 0.1
SEED_MAX_DELAY = 2.0
SEED_MIN_TOKENS = 10
SEED_MAX_TOKENS = 512
# With --duration the workload is a pool that users cycle through; its size unless --requests says.
DURATION_POOL_SIZE = 1000
# Every flag that may take a comma-separated list to sweep, and the LoadConfig field it sets.
SWEEP_FLAGS = {
    "concurrency": "concurrency",
    "request_rate": "request_rate",
    "max_concurrency": "max_concurrency",
}


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run needs, resolved once from the command line."""

    # API base URL including /v1, without a trailing slash.
    base_url: str
    # Full URL requests are POSTed to.
    request_url: str
    # URL of the server's /tokenize (the base URL without /v1).
    tokenize_url: str
    # The API spoken (--backend).
    api: Api
    # Model name sent; "auto" = the first model the server lists.
    model: str
    stream: bool
    include_usage: bool
    ignore_eos: bool
    headers: dict[str, str]
    extra_body: dict[str, Any]
    workload: WorkloadConfig
    # One LoadConfig per sweep level (a single one without a sweep).
    levels: list[LoadConfig]
    # The flag being swept ("concurrency", ...), None without a sweep.
    sweep_name: str | None
    num_warmups: int
    percentiles: list[float]
    request_timeout_s: float
    save_result: str | None
    save_detailed: bool
    plot: str | None
    show_progress: bool
    # Passed through to the result JSON.
    metadata: dict[str, str] = field(default_factory=dict)
    # Processes each load level is sent from (bench/workers.py); 1 = this process.
    client_processes: int = 1
    # Open each level's connections before it starts (LoadGenerator.open_connections).
    warm_connections: bool = True
    # --goodput's objectives, {metric: ms} (goodput.GOODPUT_METRICS); empty without it.
    goodput: dict[str, float] = field(default_factory=dict)

    @property
    def warm_url(self) -> str | None:
        """What the client GETs to open a level's connections (None: it does not)."""
        return self.base_url + "/models" if self.warm_connections else None


def parse_list(text: str, kind: type, flag: str) -> list[Any]:
    """Parses a comma-separated flag value ("1,4,16"); raises ValueError naming the flag."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ValueError(f"--{flag}: no value given")
    return values


def _sweeps(args: argparse.Namespace) -> tuple[dict[str, list[Any]], str | None]:
    """The values of every list-capable flag that was given, and the one swept (None without a sweep)."""
    sweeps = {
        name: parse_list(
            getattr(args, name), float if name == "request_rate" else int, name.replace("_", "-")
        )
        for name in SWEEP_FLAGS
        if getattr(args, name) is not None
    }
    swept = [name for name, values in sweeps.items() if len(values) > 1]
    if len(swept) > 1:
        raise ValueError(
            f"sweep one flag at a time; got lists for {', '.join('--' + s.replace('_', '-') for s in swept)}"
        )
    return sweeps, swept[0] if swept else None


def from_args(args: argparse.Namespace) -> BenchConfig:
    """Validates the parsed flags and resolves their defaults; raises ValueError with the flag at fault."""
    sweeps, sweep_name = _sweeps(args)
    base_url = _normalize_base_url(args.base_url)
    api = BACKENDS[args.backend]
    endpoint_path = args.endpoint or API_PATHS[api]
    if not endpoint_path.startswith("/"):
        # Joined to --base-url as it is: "chat/completions" asked for /v1chat/completions, a 404 each.
        raise ValueError(f"--endpoint is a path after --base-url and starts with '/', got {endpoint_path!r}")
    _check_outputs(args)
    root = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    return BenchConfig(
        base_url=base_url,
        request_url=base_url + endpoint_path,
        tokenize_url=root + "/tokenize",
        api=api,
        model=args.model,
        stream=args.stream,
        include_usage=not args.no_include_usage,
        ignore_eos=args.ignore_eos or args.output_len is not None,
        headers=_headers(args),
        extra_body=_extra_body(args),
        workload=_workload(args, open_loop=_is_open_loop(sweeps)),
        levels=_levels(args, sweeps),
        sweep_name=sweep_name,
        num_warmups=_at_least(args.num_warmups, 0, "num-warmups"),
        percentiles=_percentiles(args.metric_percentiles),
        request_timeout_s=_positive(args.request_timeout, "request-timeout", finite=True),
        save_result=args.save_result,
        save_detailed=args.save_detailed,
        plot=args.plot,
        show_progress=not args.disable_tqdm,
        metadata=dict(_key_values(args.metadata or [], "metadata")),
        client_processes=_at_least(args.client_processes, 1, "client-processes"),
        warm_connections=not args.no_warm_connections,
        goodput=parse_goodput(args.goodput or [], args.stream),
    )


def _normalize_base_url(url: str) -> str:
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/responses"):
        if url.endswith(suffix):  # the seed tolerated a full endpoint URL here
            url = url[: -len(suffix)]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {url!r}")
    return url


def _is_open_loop(sweeps: dict[str, list[Any]]) -> bool:
    return "request_rate" in sweeps or "max_concurrency" in sweeps


def _levels(args: argparse.Namespace, sweeps: dict[str, list[Any]]) -> list[LoadConfig]:
    duration = _positive(args.duration, "duration", finite=True) if args.duration is not None else None
    if args.burstiness is not None and not _is_open_loop(sweeps):
        raise ValueError("--burstiness shapes open-loop arrivals: it needs --request-rate")
    if not _is_open_loop(sweeps):
        users = sweeps.get("concurrency", [SEED_CONCURRENCY])
        return [
            LoadConfig(concurrency=_at_least(n, 1, "concurrency"), duration_s=duration, seed=args.seed)
            for n in users
        ]
    if "concurrency" in sweeps:
        raise ValueError(
            "--concurrency sets closed-loop users; with --request-rate use --max-concurrency to cap in-flight requests"
        )
    burstiness = _positive(args.burstiness if args.burstiness is not None else 1.0, "burstiness")
    rates = sweeps.get("request_rate", [math.inf])
    caps: list[int | None] = list(sweeps.get("max_concurrency", [None]))
    return [
        LoadConfig(
            request_rate=_positive(rate, "request-rate"),
            burstiness=burstiness,
            max_concurrency=None if cap is None else _at_least(cap, 1, "max-concurrency"),
            duration_s=duration,
            seed=args.seed,
        )
        for rate in rates
        for cap in caps
    ]


def _workload(args: argparse.Namespace, open_loop: bool) -> WorkloadConfig:
    dataset = _dataset_name(args, open_loop)
    min_tokens = _at_least(
        args.min_tokens if args.min_tokens is not None else SEED_MIN_TOKENS, 1, "min-tokens"
    )
    max_tokens = _at_least(
        args.max_tokens if args.max_tokens is not None else SEED_MAX_TOKENS,
        min_tokens,
        "max-tokens",
        _bound("min-tokens", args.min_tokens),
    )
    min_delay = 0.0 if open_loop else _at_least(_or(args.min_delay, SEED_MIN_DELAY), 0.0, "min-delay")
    max_delay = (
        0.0
        if open_loop
        else _at_least(
            _or(args.max_delay, SEED_MAX_DELAY), min_delay, "max-delay", _bound("min-delay", args.min_delay)
        )
    )
    default_requests = DURATION_POOL_SIZE if args.duration is not None else SEED_REQUESTS
    return WorkloadConfig(
        dataset_name=dataset,
        dataset_path=args.dataset_path,
        num_requests=_at_least(_or(args.requests, default_requests), 1, "requests"),
        input_len=None if args.input_len is None else _at_least(args.input_len, 1, "input-len"),
        output_len=None if args.output_len is None else _at_least(args.output_len, 1, "output-len"),
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        min_delay=min_delay,
        max_delay=max_delay,
        seed=args.seed,
        prompt_repeat=_at_least(args.prompt_repeat, 1, "prompt-repeat"),
    )


def _dataset_name(args: argparse.Namespace, open_loop: bool) -> str:
    """The dataset to use, after checking the length and delay flags make sense with it."""
    dataset = DATASET_ALIASES.get(args.dataset_name or "", args.dataset_name)
    if dataset is None:
        dataset = "random" if args.input_len is not None else "builtin"
    if dataset not in DATASET_NAMES:
        raise ValueError(
            f"--dataset-name must be one of {', '.join(DATASET_NAMES)}, got {args.dataset_name!r}"
        )
    if args.input_len is not None and dataset != "random":
        raise ValueError(
            f"--input-len sets the length of random prompts; it does not apply to the {dataset} dataset"
        )
    if dataset == "random" and args.input_len is None:
        raise ValueError("the random dataset needs --input-len")
    if dataset in ("jsonl", "sharegpt") and not args.dataset_path:
        raise ValueError(f"the {dataset} dataset needs --dataset-path")
    if dataset not in ("jsonl", "sharegpt") and args.dataset_path:
        raise ValueError(
            f"--dataset-path is read by the jsonl and sharegpt datasets, not the {dataset} one; "
            "set --dataset-name"
        )
    if args.output_len is not None and (args.min_tokens is not None or args.max_tokens is not None):
        raise ValueError("--output-len fixes max_tokens; do not combine it with --min-tokens/--max-tokens")
    if open_loop and ((args.min_delay or 0) > 0 or (args.max_delay or 0) > 0):
        raise ValueError(
            "--min-delay/--max-delay are closed-loop think times; open loop (--request-rate) paces by arrivals"
        )
    return str(dataset)


def _headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"}
    headers.update(_key_values(args.header or [], "header"))
    return headers


# What any OpenAI-compatible server refuses, every request of the run failing with a 400.
SAMPLING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a number at least 0"),
    "top_p": (lambda v: 0 < v <= 1, "above 0 and at most 1"),
    "top_k": (lambda v: v >= -1, "at least -1 (-1 and 0: off)"),
}


def _extra_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, (accepted, described) in SAMPLING_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not accepted(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {described}, got {value}")
        body[name] = value
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as exc:
            raise ValueError(f"--extra-body must be a JSON object: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        body.update(extra)
    return body


def _key_values(items: list[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--{flag} expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output flags that would fail, or be ignored, only once the run is over (its results
    then lost)."""
    if args.save_result is None:
        for flag, given in (("save-detailed", args.save_detailed), ("metadata", args.metadata)):
            if given:
                raise ValueError(f"--{flag} goes into the --save-result file; give --save-result")
    for flag, path in (("save-result", args.save_result), ("plot", args.plot)):
        if path is None:
            continue
        problem = _unwritable(Path(path))
        if problem is not None:
            raise ValueError(f"--{flag} {path}: {problem}")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'batchlm[bench]'")


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be written at `path`, or None."""
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "it is not writable"
    parent = path.resolve().parent
    return None if parent.is_dir() and os.access(parent, os.W_OK) else f"{parent} is not a writable directory"


def _percentiles(text: str) -> list[float]:
    values = parse_list(text, float, "metric-percentiles")
    for value in values:
        if not 0 <= value <= 100:
            raise ValueError(f"--metric-percentiles: {value} is not within 0..100")
    return values


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _at_least(value: Any, minimum: float, flag: str, bound: str = "") -> Any:
    # NaN passed `value < minimum`, and an infinite think time never ends.
    if not math.isfinite(value):
        raise ValueError(f"--{flag} must be a finite number, got {value}")
    if value < minimum:
        raise ValueError(f"--{flag} must be >= {minimum}{bound}, got {value}")
    return value


def _bound(flag: str, given: object) -> str:
    """How an error names a bound that is another flag's value: given, or its default."""
    return f" (--{flag})" if given is not None else f" (--{flag}'s default; set --{flag} lower)"


def _positive(value: float, flag: str, finite: bool = False) -> float:
    """`value` if above 0; `finite` refuses infinity too (--request-rate and --burstiness take it)."""
    if finite and math.isinf(value):
        raise ValueError(f"--{flag} must be a finite number, got {value}")
    if not value > 0:
        raise ValueError(f"--{flag} must be > 0, got {value}")
    return value
