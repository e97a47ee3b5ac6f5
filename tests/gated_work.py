"""Work held on a gate while /health is asked: a server that did that work on its event loop could not
answer (the test then fails on its timeout, not on a measured time)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx

from batchlm.server.background import BackgroundServer


class Gate:
    """Holds the gated work until the test opens it; says when the work has reached it."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.reached = threading.Event()

    def hold(self) -> None:
        self.reached.set()
        assert self.open.wait(60), "the test never opened the gate"


def answered_while_held(server: BackgroundServer, gate: Gate, send: Callable[[httpx.Client], Any]) -> Any:
    """The answer to `send`, having checked that /health answers while its work waits on the gate."""
    client = httpx.Client(base_url=server.base_url, timeout=60)
    result: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: result.append(send(client)))
    worker.start()
    try:
        assert gate.reached.wait(60), "the gated work never started"
        for _ in range(5):
            assert httpx.get(f"{server.base_url}/health", timeout=60).status_code == 200
    finally:
        gate.open.set()
        worker.join(60)
    assert result, "the request never finished"
    return result[0]
