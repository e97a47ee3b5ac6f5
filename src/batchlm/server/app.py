"""Builds the FastAPI app for one engine: routes, OpenAI-shaped errors, middleware, metrics, stats logging."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from batchlm import __version__
from batchlm.engine.client import EngineClient
from batchlm.server.errors import install_error_handlers
from batchlm.server.fast_routes import FastGenerationRoutes
from batchlm.server.generation import InFlight
from batchlm.server.metrics import ServerMetrics, StatsLogger
from batchlm.server.middleware import (
    APIKeyMiddleware,
    ArrivalStampMiddleware,
    BodySizeLimitMiddleware,
    HostCheckMiddleware,
    RequestIdEchoMiddleware,
)
from batchlm.server.pages import install_chat_page, install_docs_pages
from batchlm.server.response_store import ResponseStore
from batchlm.server.root_path import RootPath, checked_root_path
from batchlm.server.route_aliases import RouteAliases
from batchlm.server.routes import router
from batchlm.server.state import ServerSettings, ServerState
from batchlm.temp_dirs import RESPONSES_PREFIX, temp_dir


def build_app(
    engine: EngineClient, settings: ServerSettings | None = None, *, log_stats: bool = True
) -> FastAPI:
    """An app serving `engine`. It does not start the engine: /health answers 503 until the engine is
    ready (see batchlm.server.launcher, which starts both). log_stats=False leaves the periodic stats
    line to another process serving the same engine."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine)
    state = ServerState(
        engine=engine, settings=settings, metrics=metrics, in_flight=InFlight(metrics.in_flight)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with contextlib.ExitStack() as cleanup:
            if settings.stored_responses > 0:
                directory = settings.responses_dir or cleanup.enter_context(temp_dir(RESPONSES_PREFIX))
                state.responses = ResponseStore(Path(directory), settings.stored_responses)
                cleanup.callback(state.responses.close)
            if not log_stats:
                yield
                return
            stats_task = asyncio.ensure_future(StatsLogger(engine, settings.stats_log_interval_s).run())
            try:
                yield
            finally:
                stats_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stats_task

    app = FastAPI(
        title="batchlm",
        version=__version__,
        description="OpenAI-compatible LLM inference with continuous batching.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs_pages, with local assets
        redoc_url=None,
    )
    app.state.batchlm = state
    app.include_router(router)
    install_docs_pages(app)
    if settings.ui:
        install_chat_page(app)
    install_error_handlers(app, metrics.count_error)
    # Added first = innermost: after the key and size checks, before FastAPI's routing.
    app.add_middleware(FastGenerationRoutes, observe=metrics.count_error)
    # Outside the fast routes, so that /v1/chat/completions/ takes them too.
    app.add_middleware(RouteAliases, routes=app.router.routes)
    # Added last = outermost: the key is checked before a large body is read.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        observe=metrics.count_error,
        body_timeout_s=settings.body_timeout_s,
    )
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key, observe=metrics.count_error)
    app.add_middleware(ArrivalStampMiddleware)
    allowed_hosts = settings.allowed_hosts
    # None: settings built in code (tests, an embedding app) rather than resolved from a bind at
    # start-up (cli.run), which always gives one.
    if allowed_hosts is not None and not allowed_hosts.any_host:
        # Outside every layer that reads or acts on a request; inside the request id's, so that a
        # refusal carries one too.
        app.add_middleware(HostCheckMiddleware, allowed=allowed_hosts, observe=metrics.count_error)
    app.add_middleware(RequestIdEchoMiddleware)
    if root_path := checked_root_path(settings.root_path):
        # Outermost: every layer inside sees the path as ASGI has it under the prefix.
        app.add_middleware(RootPath, root_path=root_path)
    return app
