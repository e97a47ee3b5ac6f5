"""Runs a configured benchmark end to end: session, workload, warm-up, each load level, outputs."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from batchlm.bench.config import BenchConfig
from batchlm.bench.datasets import DatasetError
from batchlm.bench.loadgen import LoadConfig, LoadGenerator, LoadOutcome
from batchlm.bench.metrics import compute_metrics
from batchlm.bench.openai_format import BACKENDS, EndpointConfig
from batchlm.bench.progress import Progress, shown
from batchlm.bench.records import RequestSpec
from batchlm.bench.report import (
    LevelReport,
    RunInfo,
    describe_load,
    failure_alarm,
    format_table,
    result_json,
)
from batchlm.bench.selfcheck import ClientCheck, LoopMonitor
from batchlm.bench.spec_counters import activity_between, read_spec_counters
from batchlm.bench.sweep import format_sweep_table, level_label
from batchlm.bench.tokencount import OutputTokenCounting, TokenCountError, make_counter
from batchlm.bench.workload import Workload, build_workload


class SetupError(RuntimeError):
    """The run cannot start (model lookup, prompt building); the message says why."""


@dataclasses.dataclass
class BenchRun:
    """Everything one invocation measured."""

    info: RunInfo
    levels: list[LevelReport]


async def main_async(config: BenchConfig) -> int:
    """The `batchlm bench` run; prints reports and writes requested files. Returns the exit status
    (130 when interrupted: a sweep's finished levels are still reported and saved)."""
    finished: list[BenchRun] = []
    try:
        bench_run = await run_benchmark(config, finished=finished)
    except SetupError as exc:
        print(f"batchlm bench: error: {exc}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:
        # Ctrl-C cancels this task; levels already measured are not thrown away with the one running.
        if not finished or not finished[0].levels:
            raise
        partial = finished[0]
        print(
            f"\nbatchlm bench: interrupted; reporting the {len(partial.levels)} finished level(s) of "
            f"{len(config.levels)}",
            file=sys.stderr,
        )
        if config.sweep_name is not None:
            print(format_sweep_table(partial.levels))
        write_outputs(config, partial)
        return 130
    write_outputs(config, bench_run)
    alarms = [alarm for level in bench_run.levels if (alarm := failure_alarm(level)) is not None]
    for alarm in alarms:
        print(alarm, file=sys.stderr)
    return 1 if alarms else 0


async def run_benchmark(
    config: BenchConfig, echo: bool = True, finished: list[BenchRun] | None = None
) -> BenchRun:
    """Sends the workload at every load level over one pooled session and returns the measurements.
    `finished` receives the run as it stands, each level added as it completes (what an interrupted
    run can still report)."""
    limits = [load.in_flight_limit for load in config.levels]
    pool_size = 0 if any(limit is None for limit in limits) else max(int(limit or 0) for limit in limits)
    connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        served = await _served_models(session, config)
        endpoint = await _endpoint(config, served)
        workload = await _workload(session, config, endpoint, _context_length(served, endpoint.model))
        info = RunInfo(
            backend=next(name for name, api in BACKENDS.items() if api == config.api),
            model_id=endpoint.model,
            base_url=config.base_url,
            stream=config.stream,
            dataset_name=config.workload.dataset_name,
            prompt_length_method=workload.prompt_length_method,
            num_prompts=len(workload.specs),
        )
        _say(
            echo,
            f"Benchmarking {config.request_url} (model {endpoint.model}, stream={config.stream}), "
            f"{len(workload.specs)} {config.workload.dataset_name} prompts",
        )
        if workload.fitted_to_context is not None:
            _say(
                echo,
                f"Built-in prompts cut to fit the served model's {workload.fitted_to_context}-token context "
                f"with up to {config.workload.output_len or config.workload.max_tokens} output tokens",
            )
        await _warm_up(session, endpoint, workload.specs, config, echo)
        counting = OutputTokenCounting(session, config.tokenize_url, config.headers)
        levels: list[LevelReport] = []
        if finished is not None:
            finished.append(BenchRun(info, levels))
        for load in config.levels:
            level = await _run_level(session, endpoint, workload, load, config, echo, counting)
            levels.append(level)
            _say(echo, format_table(level, info))
    if config.sweep_name is not None:
        _say(echo, format_sweep_table(levels))
    return BenchRun(info, levels)


async def _endpoint(config: BenchConfig, served: list[dict[str, Any]] | str) -> EndpointConfig:
    model = config.model
    if model == "auto":
        if isinstance(served, str):
            raise SetupError(f"--model auto: {served}")
        model = str(served[0]["id"])
    return EndpointConfig(
        url=config.request_url,
        api=config.api,
        model=model,
        stream=config.stream,
        include_usage=config.include_usage,
        ignore_eos=config.ignore_eos,
        headers=config.headers,
        extra_body=config.extra_body,
        keep_text=config.save_detailed,
    )


# How long the first request to the server (GET /models) may go unanswered: a live server lists its
# models at once, and a wrong address that accepts connections but never answers (another service,
# a stopped process's port) would otherwise keep the client silent for the whole --request-timeout.
PROBE_TIMEOUT_S = 30.0


async def _served_models(session: aiohttp.ClientSession, config: BenchConfig) -> list[dict[str, Any]] | str:
    """The entries of GET {base}/models, or why there are none. No answer at all stops the run."""
    url = config.base_url + "/models"
    waited = min(PROBE_TIMEOUT_S, config.request_timeout_s)
    try:
        async with session.get(
            url, headers=config.headers, timeout=aiohttp.ClientTimeout(total=waited)
        ) as response:
            payload: Any = await response.json(content_type=None)
    except TimeoutError:  # (asyncio's, which aiohttp raises, is this one from Python 3.11)
        raise SetupError(
            f"GET {url} got no answer in {waited:g} s: is a server listening at --base-url {config.base_url}?"
        ) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return f"GET {url} failed: {exc}"
    models = payload.get("data") if isinstance(payload, dict) else None
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, dict) and "id" in m for m in models)
    ):
        return f"GET {url} listed no models: {str(payload)[:200]}"
    return models


def _context_length(served: list[dict[str, Any]] | str, model: str) -> int | None:
    """The model's max_model_len as the server lists it (vLLM and batchlm do): the entry of that name,
    else the first one (a server that answers to any name); None when the server does not say."""
    if isinstance(served, str):
        return None
    entry = next((m for m in served if m["id"] == model), served[0])
    value = entry.get("max_model_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def _workload(
    session: aiohttp.ClientSession, config: BenchConfig, endpoint: EndpointConfig, max_model_len: int | None
) -> Workload:
    try:
        return await build_workload(
            config.workload, lambda: make_counter(session, config.tokenize_url, endpoint), max_model_len
        )
    except (DatasetError, TokenCountError, ValueError) as exc:
        raise SetupError(str(exc)) from None


async def _warm_up(
    session: aiohttp.ClientSession,
    endpoint: EndpointConfig,
    specs: list[RequestSpec],
    config: BenchConfig,
    echo: bool,
) -> None:
    """Sends --num-warmups requests (no think time) whose results are discarded."""
    if config.num_warmups == 0:
        return
    warm_specs = [
        dataclasses.replace(specs[i % len(specs)], think_time=0.0) for i in range(config.num_warmups)
    ]
    parallel = min(config.num_warmups, config.levels[0].in_flight_limit or config.num_warmups)
    outcome = await LoadGenerator(session, endpoint, warm_specs).run(LoadConfig(concurrency=parallel))
    failed = [r.error for r in outcome.results if r.error is not None]
    note = f"; first failure: {failed[0]}" if failed else ""
    _say(echo, f"Warm-up: {len(warm_specs) - len(failed)}/{len(warm_specs)} requests succeeded{note}")


async def _run_level(
    session: aiohttp.ClientSession,
    endpoint: EndpointConfig,
    workload: Workload,
    load: LoadConfig,
    config: BenchConfig,
    echo: bool,
    counting: OutputTokenCounting,
) -> LevelReport:
    label = level_label(load, config.sweep_name)
    _say(echo, f"Running {label}: {describe_load(load)}")
    metrics_url = _metrics_url(config)
    spec_before = await read_spec_counters(session, metrics_url, config.headers)
    outcome, check = await _measure_level(session, endpoint, workload, load, config, echo)
    spec_after = await read_spec_counters(session, metrics_url, config.headers)
    # After the level, so that the counting requests neither load the server nor take client time.
    await counting.count(outcome.results)
    metrics = compute_metrics(
        outcome.results, outcome.run_start, outcome.duration_s, config.percentiles, config.goodput
    )
    return LevelReport(label, load, outcome, metrics, check, activity_between(spec_before, spec_after))


def _metrics_url(config: BenchConfig) -> str:
    """The server's /metrics, beside its /tokenize (both at the root, outside /v1)."""
    root = config.tokenize_url.removesuffix("/tokenize")
    return root + "/metrics"


async def _measure_level(
    session: aiohttp.ClientSession,
    endpoint: EndpointConfig,
    workload: Workload,
    load: LoadConfig,
    config: BenchConfig,
    echo: bool,
) -> tuple[LoadOutcome, ClientCheck]:
    if config.client_processes > 1:
        return await _run_level_in_processes(endpoint, workload, load, config)
    total = None if load.duration_s is not None else len(workload.specs)
    progress = Progress(total, load.duration_s) if config.show_progress and echo else None
    generator = LoadGenerator(session, endpoint, workload.specs, progress, config.warm_url)
    await generator.open_connections(load)
    gc.collect()
    gc.freeze()  # keep the collector from walking the workload during the run (fewer pauses)
    monitor = LoopMonitor()
    monitor.start()
    try:
        async with shown(progress):
            outcome = await generator.run(load)
    finally:
        check = await monitor.stop()
        gc.unfreeze()
    return outcome, dataclasses.replace(check, max_dispatch_delay_s=outcome.max_dispatch_delay_s)


async def _run_level_in_processes(
    endpoint: EndpointConfig, workload: Workload, load: LoadConfig, config: BenchConfig
) -> tuple[LoadOutcome, ClientCheck]:
    from batchlm.bench.workers import ClientWorkerError, run_in_processes

    try:
        return await asyncio.get_running_loop().run_in_executor(
            None,
            run_in_processes,
            endpoint,
            workload.specs,
            load,
            config.client_processes,
            config.request_timeout_s,
            config.warm_url,
        )
    except ClientWorkerError as error:
        raise SetupError(str(error)) from None


def write_outputs(config: BenchConfig, bench_run: BenchRun) -> None:
    """Writes --save-result (one object, or a list for a sweep) and --plot."""
    if config.save_result:
        records = [
            result_json(level, bench_run.info, config.save_detailed, config.metadata)
            for level in bench_run.levels
        ]
        # A sweep's file is a list even when an interruption left one level in it.
        payload = records if config.sweep_name is not None else records[0]
        Path(config.save_result).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"Saved results to {config.save_result}")
    if config.plot:
        from batchlm.bench.plot import plot_run, plot_sweep

        if len(bench_run.levels) == 1:
            plot_run(bench_run.levels[0], config.plot)
        else:
            plot_sweep(bench_run.levels, config.sweep_name or "level", config.plot)
        print(f"Saved plot to {config.plot}")


def _say(echo: bool, text: str) -> None:
    if echo:
        print(text, flush=True)
