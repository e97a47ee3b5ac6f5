"""Logging for the `batchlm` commands: one format for batchlm and uvicorn; the access log only at DEBUG."""

from __future__ import annotations

import logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, tag: str | None = None) -> None:
    """Root handler at `level`. uvicorn's access log (a line per HTTP request) is kept for DEBUG: at
    hundreds of requests a second it would drown the periodic stats line. `tag` marks the lines of
    one of several processes (e.g. "api-server-1")."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    log_format = LOG_FORMAT if tag is None else LOG_FORMAT.replace("%(name)s", f"[{tag}] %(name)s")
    logging.basicConfig(level=level.upper(), format=log_format, force=True)
    access_level = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    logging.getLogger("uvicorn.access").setLevel(access_level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level.upper())
