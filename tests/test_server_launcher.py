"""The server's runtime: uvicorn on the httptools parser and the uvloop event loop, both dependencies
because a streamed token costs the front end less CPU on them (BENCHMARKS.md, front-end capacity)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchlm.server.app import build_app
from batchlm.server.launcher import GracefulServer, run_event_loop
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine


def test_uvicorn_parses_http_with_httptools() -> None:
    config = GracefulServer(build_app(FakeEngine(), ServerSettings())).config
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not build on Windows")
def test_the_server_loop_is_uvloop() -> None:
    import uvloop

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert isinstance(run_event_loop(running_loop()), uvloop.Loop)
