"""A batch's lines sent to a server (`run_lines`, against a stand-in for the server): each result
with its response's request id, a server gone away failing each line on its own, the input read only
as far as the window allows, and a run interrupted or whose output fails."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from batch_harness import line
from batchlm.batch_file import OutputWriteError
from batchlm.run_batch import BatchProgress, run_lines


def test_a_server_that_went_away_fails_each_line_on_its_own() -> None:
    lines = [line(f"r{i}", "/v1/completions", {"prompt": "x"}) for i in range(5)] + ["{}"]
    out = io.StringIO()
    # The discard port: every connection is refused.
    progress = asyncio.run(run_lines("http://127.0.0.1:9", lines, out, 2, 60.0))
    results = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [r["custom_id"] for r in results] == ["r0", "r1", "r2", "r3", "r4", None]
    assert [r["error"]["code"] for r in results] == ["request_failed"] * 5 + ["invalid_request"]
    assert (progress.done, progress.failed, progress.invalid) == (6, 5, 1)


@asynccontextmanager
async def completions_server(
    release: asyncio.Event, received: asyncio.Event, served: list[str] | None = None
) -> AsyncIterator[str]:
    """A /v1/completions stand-in: the prompt "slow" is answered once `release` is set (`received` is
    set when it arrives), every other one at once; `served` collects the prompts."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        if served is not None:
            served.append(body["prompt"])
        if body["prompt"] == "slow":
            received.set()
            await release.wait()
        return web.json_response(
            {"id": f"cmpl-{body['prompt']}", "usage": {"completion_tokens": 1}},
            headers={"X-Request-Id": f"req_{body['prompt']}"},
        )

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    async with TestServer(app) as server:
        yield f"http://{server.host}:{server.port}"


def test_a_results_request_id_is_its_responses_x_request_id() -> None:
    """As in OpenAI's batch output, where it differs from the body's id: the id the server's log lines
    for that request name."""
    lines = [line(f"p{i}", "/v1/completions", {"prompt": f"p{i}"}) for i in range(3)]
    out = io.StringIO()

    async def go() -> None:
        async with completions_server(asyncio.Event(), asyncio.Event()) as base_url:
            await run_lines(base_url, lines, out, 2, 60.0)

    asyncio.run(asyncio.wait_for(go(), timeout=60))
    responses = [json.loads(text)["response"] for text in out.getvalue().splitlines()]
    assert [r["request_id"] for r in responses] == ["req_p0", "req_p1", "req_p2"]
    assert [r["body"]["id"] for r in responses] == ["cmpl-p0", "cmpl-p1", "cmpl-p2"]


def test_an_interrupted_run_writes_every_result_that_finished() -> None:
    """A run cancelled (Ctrl-C) while line 0 still runs: the lines after it that finished are written,
    in input order, rather than lost behind it."""
    lines = [line("slow", "/v1/completions", {"prompt": "slow"})]
    lines += [line(f"fast-{i}", "/v1/completions", {"prompt": f"fast-{i}"}) for i in range(4)] + ["x"]
    out = io.StringIO()

    async def go() -> BatchProgress:
        release, received = asyncio.Event(), asyncio.Event()
        progress = BatchProgress(total=len(lines))
        async with completions_server(release, received) as base_url:
            run = asyncio.ensure_future(run_lines(base_url, lines, out, 8, 60.0, progress))
            await received.wait()
            while progress.done < len(lines) - 1:  # all but the slow line, which is held back
                await asyncio.sleep(0.01)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            release.set()
        return progress

    progress = asyncio.run(asyncio.wait_for(go(), timeout=60))
    results = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [r["custom_id"] for r in results] == ["fast-0", "fast-1", "fast-2", "fast-3", None]
    assert results[0]["response"]["body"]["id"] == "cmpl-fast-0"
    assert (progress.done, progress.invalid) == (5, 1)


def test_the_input_is_read_only_as_far_as_the_window_allows() -> None:
    """Lines are read as they can run, not all at first: a slow line 0 holds the reading at the window
    (4 x the concurrency), lines that cannot run included, so a file of any length runs in bounded
    memory."""
    concurrency = 2
    window = 4 * concurrency
    release, received = asyncio.Event(), asyncio.Event()
    read_too_early: list[int] = []

    def source() -> Iterator[str]:
        for index in range(200):
            if index > window and not release.is_set():
                read_too_early.append(index)
            if index == 0:
                yield line("slow", "/v1/completions", {"prompt": "slow"})
            elif index in (2, 4):
                yield line(f"r{index}", "/v1/completions", {"prompt": f"p{index}"})
            else:  # lines that cannot run are held back too: their errors wait for line 0
                yield "not json"

    out = io.StringIO()

    async def go() -> BatchProgress:
        progress = BatchProgress(total=None)
        async with completions_server(release, received) as base_url:
            run = asyncio.ensure_future(run_lines(base_url, source(), out, concurrency, 60.0, progress))
            await received.wait()
            while progress.done < window - 1:  # every line of the window but the slow one
                await asyncio.sleep(0.01)
            release.set()
            return await run

    progress = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert read_too_early == []
    assert (progress.done, progress.invalid) == (200, 197)
    results = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [r["custom_id"] for r in results[:5]] == ["slow", None, "r2", None, "r4"] and len(results) == 200


class FullDisk(io.StringIO):
    """An output that takes one line, then fails as a full disk (or a closed pipe) does."""

    def write(self, text: str) -> int:
        if self.getvalue():
            raise OSError(28, "No space left on device")
        return super().write(text)


def test_an_output_that_fails_stops_the_run_at_once() -> None:
    """A write that fails stops the run: the rest of the file is not run for results that would be
    lost, and the failure surfaces as one error rather than a task's traceback at the end."""
    lines = [line(f"r{i}", "/v1/completions", {"prompt": f"p{i}"}) for i in range(50)]
    served: list[str] = []
    out = FullDisk()

    async def go() -> None:
        release, received = asyncio.Event(), asyncio.Event()
        release.set()
        async with completions_server(release, received, served) as base_url:
            await run_lines(base_url, lines, out, 2, 60.0)

    with pytest.raises(OutputWriteError, match="No space left"):
        asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert json.loads(out.getvalue())["custom_id"] == "r0"
    assert len(served) <= 6  # the two lines written or failed, and those already in flight
