"""`batchlm serve`: flags generated from EngineConfig and ServerSettings; builds the engine and the app and
runs them until SIGINT/SIGTERM/SIGHUP."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace
from typing import Any

from batchlm.backends import BACKEND_CHOICES, create_engine, resolve_backend
from batchlm.config import EngineConfig
from batchlm.engine.client import EngineClient
from batchlm.flags import (
    POSITIVE,
    Bounds,
    add_dataclass_arguments,
    add_engine_arguments,
    dataclass_from_args,
    engine_flag_conflicts,
)
from batchlm.logging_setup import LOG_LEVELS, configure_logging
from batchlm.reasoning.registry import REASONING_PARSER_CHOICES
from batchlm.sampling_defaults import check_generation_config
from batchlm.sampling_params import MAX_N
from batchlm.server.allowed_hosts import (
    AllowedHosts,
    listens_beyond_loopback,
    parse_allowed_hosts,
    resolve_allowed_hosts,
)
from batchlm.server.open_files import connection_limit, raise_open_file_limit
from batchlm.server.root_path import checked_root_path
from batchlm.server.state import ServerSettings
from batchlm.stop_signals import StopsAsInterrupts
from batchlm.temp_dirs import (
    METRICS_PREFIX,
    RESPONSES_PREFIX,
    make_temp_dir,
    remove_abandoned_once,
    remove_temp_dir,
)
from batchlm.tools.registry import TOOL_CALL_PARSER_CHOICES

logger = logging.getLogger(__name__)

API_KEY_ENV = "BATCHLM_API_KEY"

SERVER_FLAG_NAMES = {
    "api_servers": ["--api-servers"],
    "shutdown_timeout_s": ["--shutdown-timeout"],
    "stats_log_interval_s": ["--stats-log-interval"],
    "max_body_bytes": ["--max-body-bytes"],
    "body_timeout_s": ["--body-timeout"],
    "header_timeout_s": ["--header-timeout"],
    "keep_alive_timeout_s": ["--keep-alive-timeout"],
}
SERVER_HELP_NOTES = {"api_key": f" (or set {API_KEY_ENV})"}
# "" is a value of its own there: every interface, and the root.
SERVER_MAY_BE_EMPTY = frozenset({"host", "root_path"})
SERVER_BOUNDS = {
    "port": Bounds(minimum=0, maximum=65535),  # 0: a free port the system picks
    "max_queue": Bounds(minimum=0),
    # Beyond what any request may ask for, a larger --max-n was silently that.
    "max_n": Bounds(minimum=1, maximum=MAX_N),
    "max_body_bytes": POSITIVE,
    "body_timeout_s": Bounds(above=0),
    "header_timeout_s": Bounds(above=0),
    # Clients' own headers take several hundred bytes (the OpenAI SDKs' about 700): below 1 KiB every
    # request, /health's included, was answered 431.
    "max_header_bytes": Bounds(minimum=1024),
    "max_connections": POSITIVE,
    "keep_alive_timeout_s": Bounds(above=0),
    "shutdown_timeout_s": Bounds(minimum=0),
    # Shorter intervals wrote hundreds of lines a second and kept the event loop busy.
    "stats_log_interval_s": Bounds(minimum=0.1),
    "api_servers": POSITIVE,
    "stored_responses": Bounds(minimum=0),
}


def _allowed_hosts_flag(text: str) -> AllowedHosts:
    try:
        return parse_allowed_hosts(text)
    except ValueError as error:  # argparse's own words for a ValueError would not say what is wrong
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    add_dataclass_arguments(
        server,
        ServerSettings,
        flag_names=SERVER_FLAG_NAMES,
        choices={
            "log_level": list(LOG_LEVELS),
            "backend": list(BACKEND_CHOICES),
            "tool_call_parser": list(TOOL_CALL_PARSER_CHOICES),
            "reasoning_parser": list(REASONING_PARSER_CHOICES),
        },
        help_notes=SERVER_HELP_NOTES,
        bounds=SERVER_BOUNDS,
        may_be_empty=SERVER_MAY_BE_EMPTY,
        parsers={"allowed_hosts": _allowed_hosts_flag},
    )
    add_engine_arguments(parser)


def check_args(args: argparse.Namespace) -> str | None:
    """A combination of flags in which one would be ignored, or None. (--responses-dir with
    --stored-responses 0 is not one: storing is turned off without editing the rest of the line.)"""
    return engine_flag_conflicts(args)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    settings = dataclass_from_args(ServerSettings, args)
    return replace(
        settings,
        log_level=settings.log_level.upper(),
        api_key=settings.api_key or os.environ.get(API_KEY_ENV) or None,
    )


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    # Before any process starts: the API servers and the engine core inherit it.
    raise_open_file_limit()
    _warn_of_connections_past_the_file_limit(settings.max_connections)
    config = dataclass_from_args(EngineConfig, args)
    count = (
        settings.api_servers if settings.api_servers is not None else _automatic_api_servers(settings, config)
    )
    try:
        check_generation_config(config.generation_config)
        if (problem := _responses_dir_problem(settings)) is not None:
            raise ValueError(problem)
        settings = replace(
            settings,
            root_path=checked_root_path(settings.root_path),
            api_servers=count,
            # Once, here: every API-server process gets the result with the settings, and no request
            # waits on DNS.
            allowed_hosts=resolve_allowed_hosts(settings.allowed_hosts, settings.host),
        )
    except ValueError as error:
        logger.error("%s", error)
        return 2
    # What servers killed earlier (SIGKILL, out of memory) left under the temp dir.
    remove_abandoned_once()
    if count > 1:
        return _run_several(settings, config, count)
    try:
        engine = create_engine(settings.backend, config, max_queue=settings.max_queue)
    except ValueError as error:  # an unknown or uninstalled backend
        logger.error("%s", error)
        return 2
    from batchlm.server.listener import bind_listener

    # Tried before the model loads, so that a port in use is an error at once; uvicorn then binds it
    # itself, on every address the host resolves to.
    try:
        with bind_listener(settings.host, settings.port) as probe:
            # --port 0: the port the system picked, so that the logs and uvicorn name the same one.
            settings = replace(settings, port=probe.getsockname()[1])
    except OSError as error:  # the port in use, a host that does not resolve
        logger.error("cannot listen on %s:%d: %s", settings.host, settings.port, error)
        return 1
    return _serve(engine, config, settings)


def _warn_of_connections_past_the_file_limit(max_connections: int | None) -> None:
    """--max-connections is there to answer 503 before the open-file limit drops connections unanswered;
    set above what that limit leaves room for, it cannot."""
    room = connection_limit()
    if max_connections is not None and room is not None and max_connections > room:
        logger.warning(
            "--max-connections %d is more than the %d connections the open-file limit leaves room for "
            "(ulimit -n): past those, connections are dropped unanswered rather than answered 503",
            max_connections,
            room,
        )


def _responses_dir_problem(settings: ServerSettings) -> str | None:
    """Why the stored responses cannot be kept in --responses-dir (None: they can), found before the
    model loads rather than as a traceback when the app starts."""
    if settings.responses_dir is None or settings.stored_responses == 0:
        return None
    import sqlite3
    from pathlib import Path

    from batchlm.server.response_store import ResponseStore

    try:
        ResponseStore(Path(settings.responses_dir), settings.stored_responses).close()
    except (OSError, sqlite3.Error) as error:
        return f"--responses-dir {settings.responses_dir}: cannot keep the stored responses there: {error}"
    return None


def _automatic_api_servers(settings: ServerSettings, config: EngineConfig) -> int:
    from batchlm.server.api_servers import automatic_api_servers

    try:
        backend = resolve_backend(settings.backend)
    except ValueError:  # reported by create_engine
        return 1
    return automatic_api_servers(config.device, backend)


def _serve(engine: EngineClient, config: EngineConfig, settings: ServerSettings, **launch: Any) -> int:
    # Outside the server's own handling (before it takes the stop signals over, and after it gives
    # them back), one ends the process as Ctrl-C does: the engine core, started before the server's
    # imports, is stopped, rather than a traceback printed (Ctrl-C) or the process ended with nothing
    # cleaned up (SIGTERM, SIGHUP).
    with StopsAsInterrupts() as stop:
        try:
            # Before the server's imports, so the engine's loading overlaps them.
            engine.begin_loading()
            from batchlm.server.app import build_app
            from batchlm.server.launcher import run_server

            app = build_app(engine, settings)
            _log_serving(config, settings)
            # Every backend's engine loads in start(), which is not part of the EngineClient interface.
            return run_server(app, engine, start_engine=engine.start, **launch)  # type: ignore[attr-defined]
        except KeyboardInterrupt:
            stop_now = getattr(engine, "stop_now", None)
            if stop_now is not None:
                stop_now()
            logger.warning("batchlm serve: %s; engine core stopped", stop.describe())
            return 0  # as a stop signal to the running server exits


def _log_serving(config: EngineConfig, settings: ServerSettings) -> None:
    # An IPv6 address goes in brackets in a URL, as uvicorn's own line writes it.
    host = f"[{settings.host}]" if ":" in settings.host else settings.host or "0.0.0.0"
    where = f"http://{host}:{settings.port}"
    count = settings.api_servers or 1
    processes = f", {count} API server processes" if count > 1 else ""
    # "demo" is a placeholder: the model it stands for is named once the engine has loaded it.
    model = "the built-in model" if config.built_in_model else config.model
    logger.info(
        "batchlm serving %s on %s (API key %s%s)",
        model,
        where,
        "on" if settings.api_key else "off",
        processes,
    )
    if not settings.api_key and listens_beyond_loopback(settings.host):
        logger.warning(
            "no API key: anyone who can reach %s may use the API; set --api-key or %s",
            where,
            API_KEY_ENV,
        )


def _run_several(settings: ServerSettings, config: EngineConfig, count: int) -> int:
    """`--api-servers N` with N > 1: this process is the primary API server; it starts the engine core
    with a pipe per API server, and N - 1 more API-server processes on the same port."""
    from batchlm.server.api_servers import (
        ApiServerPool,
        bind_first_shared_port,
        shared_port_unsupported_reason,
    )

    try:
        backend = resolve_backend(settings.backend)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    unsupported = shared_port_unsupported_reason()
    if unsupported is None and backend != "torch":
        unsupported = "several API servers need the torch backend"
    if unsupported is not None:
        logger.error("--api-servers %d: %s; use --api-servers 1", count, unsupported)
        return 2
    try:
        sock = bind_first_shared_port(settings.host, settings.port)
    except OSError as error:
        logger.error("cannot listen on %s:%d: %s", settings.host, settings.port, error)
        return 1
    settings = replace(settings, port=sock.getsockname()[1])
    # A response stored by one API server is continued through whichever one a connection lands on.
    responses_dir = None
    if settings.stored_responses > 0 and settings.responses_dir is None:
        responses_dir = make_temp_dir(RESPONSES_PREFIX)
        settings = replace(settings, responses_dir=str(responses_dir))
    # Before any metric exists: /metrics then sums the request metrics of every API server.
    metrics_dir = make_temp_dir(METRICS_PREFIX)
    from batchlm.engine.async_engine import AsyncLLMEngine
    from batchlm.server.metrics import share_metrics_between_processes

    share_metrics_between_processes(str(metrics_dir))
    try:
        engine = AsyncLLMEngine(config, max_queue=settings.max_queue, front_ends=count)
        pool = ApiServerPool(settings, config)
        engine.share_core(count - 1, pool.start)
        return _serve(engine, config, settings, sockets=[sock], api_servers=pool)
    finally:
        remove_temp_dir(metrics_dir)
        if responses_dir is not None:
            remove_temp_dir(responses_dir)
