"""`batchlm serve`: flags generated from EngineConfig and ServerSettings; builds the engine and the app and
runs them until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace

from batchlm.backends import BACKEND_CHOICES, create_engine
from batchlm.config import EngineConfig
from batchlm.flags import add_dataclass_arguments, add_engine_arguments, dataclass_from_args
from batchlm.server.logging_setup import LOG_LEVELS, configure_logging
from batchlm.server.state import ServerSettings

logger = logging.getLogger(__name__)

API_KEY_ENV = "BATCHLM_API_KEY"

SERVER_FLAG_NAMES = {
    "shutdown_timeout_s": ["--shutdown-timeout"],
    "stats_log_interval_s": ["--stats-log-interval"],
    "max_body_bytes": ["--max-body-bytes"],
}
SERVER_HELP_NOTES = {"api_key": f" (or set {API_KEY_ENV})"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    add_dataclass_arguments(
        server,
        ServerSettings,
        flag_names=SERVER_FLAG_NAMES,
        choices={"log_level": list(LOG_LEVELS), "backend": list(BACKEND_CHOICES)},
        help_notes=SERVER_HELP_NOTES,
    )
    add_engine_arguments(parser)


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
    config = dataclass_from_args(EngineConfig, args)
    try:
        engine = create_engine(settings.backend, config, max_queue=settings.max_queue)
    except ValueError as error:  # an unknown or uninstalled backend
        logger.error("%s", error)
        return 2
    # Before the server's imports, so the engine's loading overlaps them.
    engine.begin_loading()
    from batchlm.server.app import build_app
    from batchlm.server.launcher import run_server

    app = build_app(engine, settings)
    where = f"http://{settings.host}:{settings.port}"
    logger.info(
        "batchlm serving %s on %s (API key %s)", config.model, where, "on" if settings.api_key else "off"
    )
    # Every backend's engine loads in start(), which is not part of the EngineClient interface.
    return run_server(app, engine, start_engine=engine.start)  # type: ignore[attr-defined]
