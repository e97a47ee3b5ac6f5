"""`batchlm run-batch`: OpenAI Batch API lines run through the in-process server, results in input
order, lines that cannot run and requests the server refuses each reported on their own line."""

from __future__ import annotations

import asyncio
import io
import json
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from batchlm import json_text
from batchlm.batch_file import OrderedWriter, OutputWriteError, parse_line
from batchlm.cli import main
from batchlm.run_batch import BatchProgress, run_lines
from batchlm.server.protocol import ChatCompletionRequest

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_a_batch_runs_every_line_and_answers_in_input_order(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    chat = [{"role": "user", "content": "Hello there"}]
    lines = [
        line("chat", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": chat, "max_tokens": 5}),
        line(
            "text", "/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "echo": True, "logprobs": 1}
        ),
        "not json",
        line("embed", "/v1/embeddings", {"input": "x"}),
        line("refused", "/v1/chat/completions", {"messages": chat, "max_tokens": -1}),
        line("chat", "/v1/chat/completions", {"messages": chat}),
        line("streamed", "/v1/chat/completions", {"messages": chat, "stream": True}),
        line("response", "/v1/responses", {"input": "Hi", "max_output_tokens": 3}),
        line(
            "json",
            "/v1/chat/completions",
            {
                "messages": chat,
                "max_tokens": 40,
                "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            },
        ),
    ]
    # Many more than the concurrency: they finish out of order and are written in order.
    lines += [
        line(f"many-{i}", "/v1/completions", {"prompt": f"{i}", "max_tokens": 1 + i % 5}) for i in range(24)
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n\n")
    model = str(tiny_model_dir("llama"))
    flags = ["--model", model, "--device", "cpu", "--max-concurrency", "3", "--log-level", "WARNING"]
    assert main(["run-batch", "-i", str(source), "-o", str(target), *flags]) == 0
    results = [json.loads(text) for text in target.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [
        "chat", "text", None, "embed", "refused", "chat", "streamed", "response", "json",
        *[f"many-{i}" for i in range(24)],
    ]  # fmt: skip
    by_position = {index: result for index, result in enumerate(results)}
    chat_reply = by_position[0]["response"]
    assert chat_reply["status_code"] == 200 and chat_reply["body"]["object"] == "chat.completion"
    assert by_position[0]["error"] is None
    # The response's X-Request-Id, as the Batch API's request_id is (the body has its own id).
    request_ids = [r["response"]["request_id"] for r in results if r["response"] is not None]
    assert all(rid.startswith("req_") for rid in request_ids) and len(set(request_ids)) == len(request_ids)
    assert chat_reply["request_id"] != chat_reply["body"]["id"]
    echoed = by_position[1]["response"]["body"]["choices"][0]
    assert echoed["text"].startswith("Once upon") and echoed["logprobs"]["token_logprobs"][0] is None
    assert [by_position[i]["error"]["code"] for i in (2, 3, 5, 6)] == [
        "invalid_json", "invalid_url", "duplicate_custom_id", "invalid_request",
    ]  # fmt: skip
    refused = by_position[4]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "max_tokens"
    assert by_position[7]["response"]["body"]["object"] == "response"
    # Constrained as over HTTP (random weights may not close the object within max_tokens).
    constrained = by_position[8]["response"]["body"]["choices"][0]["message"]["content"]
    assert constrained.strip().startswith("{") and '"name"' in constrained
    for index in range(9, len(results)):
        usage = results[index]["response"]["body"]["usage"]
        assert usage["completion_tokens"] <= 1 + (index - 9) % 5


def test_an_empty_or_missing_input_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = str(tmp_path / "out.jsonl")
    assert main(["run-batch", "-i", str(empty), "-o", out, "--log-level", "ERROR"]) == 2
    assert main(["run-batch", "-i", str(tmp_path / "absent.jsonl"), "-o", out, "--log-level", "ERROR"]) == 2
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    nowhere = str(tmp_path / "no" / "such" / "out.jsonl")
    assert main(["run-batch", "-i", str(source), "-o", nowhere, "--log-level", "ERROR"]) == 2


def test_an_engine_that_does_not_start_fails_the_run_with_no_output(tmp_path: Path) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    flags = ["--model", str(tmp_path / "missing-model"), "--device", "cpu", "--log-level", "ERROR"]
    assert main(["run-batch", "-i", str(source), "-o", str(target), *flags]) == 1
    assert not target.exists()


def test_lines_are_checked_before_they_run() -> None:
    seen: set[str] = set()
    ok = line("a", "/v1/completions", {"prompt": "x"})
    assert parse_line(ok, seen) == ("a", "/v1/completions", {"prompt": "x"})
    refusals = {
        "[]": "invalid_request",
        json.dumps({"url": "/v1/completions", "body": {}}): "invalid_request",
        json.dumps(
            {"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}
        ): "invalid_request",
        json.dumps({"custom_id": "c", "url": "/v1/completions", "body": "x"}): "invalid_request",
        ok: "duplicate_custom_id",
        # Past Python's recursion limit: a RecursionError once, which ended the whole run.
        '{"custom_id": "d", "body": ' + "[" * 5000 + "]" * 5000 + "}": "invalid_json",
    }
    for text, code in refusals.items():
        refused = parse_line(text, seen)
        assert isinstance(refused, dict) and refused["error"]["code"] == code and refused["response"] is None


def test_a_body_nested_as_deep_as_a_request_body_may_is_read() -> None:
    """The line's object wraps the body: the nesting bound (json_text.MAX_DEPTH, as deep as the HTTP
    API's reader takes a body) counts from the body, not from the line."""

    def body(depth: int) -> dict[str, Any]:
        value: Any = 1
        for _ in range(depth - 2):
            value = [value]
        return {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": value}}

    at_limit, past_it = body(json_text.MAX_DEPTH), body(json_text.MAX_DEPTH + 1)
    ChatCompletionRequest.model_validate_json(json.dumps(at_limit))  # as the HTTP API reads a body
    with pytest.raises(ValidationError, match="recursion limit"):
        ChatCompletionRequest.model_validate_json(json.dumps(past_it))
    url = "/v1/chat/completions"
    assert parse_line(line("a", url, at_limit), set()) == ("a", url, at_limit)
    refused = parse_line(line("b", url, past_it), set())
    assert isinstance(refused, dict) and refused["error"]["code"] == "invalid_json"
    assert f"more than {json_text.MAX_DEPTH} levels inside the line's own" in refused["error"]["message"]


def test_an_empty_array_at_the_bound_is_read_as_the_http_api_reads_it() -> None:
    """pydantic's reader counts an empty array as a value inside the arrays around it, not as a level
    of its own: such a body is read, one array deeper, over HTTP and from a batch file alike."""
    value: Any = []
    for _ in range(json_text.MAX_DEPTH - 2):
        value = [value]
    body = {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"x": value}}
    ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert parse_line(line("a", "/v1/chat/completions", body), set()) == ("a", "/v1/chat/completions", body)
    body["chat_template_kwargs"] = {"x": [[value]]}
    with pytest.raises(ValidationError, match="recursion limit"):
        ChatCompletionRequest.model_validate_json(json.dumps(body))
    refused = parse_line(line("b", "/v1/chat/completions", body), set())
    assert isinstance(refused, dict) and refused["error"]["code"] == "invalid_json"


def test_a_server_that_went_away_fails_each_line_on_its_own() -> None:
    lines = [line(f"r{i}", "/v1/completions", {"prompt": "x"}) for i in range(5)] + ["{}"]
    out = io.StringIO()
    # The discard port: every connection is refused.
    progress = asyncio.run(run_lines("http://127.0.0.1:9", lines, out, 2, 60.0))
    results = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [r["custom_id"] for r in results] == ["r0", "r1", "r2", "r3", "r4", None]
    assert [r["error"]["code"] for r in results] == ["request_failed"] * 5 + ["invalid_request"]
    assert (progress.done, progress.failed, progress.invalid) == (6, 5, 1)


def test_results_are_written_in_input_order() -> None:
    out = io.StringIO()
    writer = OrderedWriter(out)
    writer.put(2, {"n": 2})
    writer.put(1, {"n": 1})
    assert out.getvalue() == ""
    writer.put(0, {"n": 0})
    assert [json.loads(text)["n"] for text in out.getvalue().splitlines()] == [0, 1, 2]


def test_a_custom_id_escaping_a_lone_surrogate_is_written_back_as_that_escape() -> None:
    # json.loads takes "\ud800" in a custom_id; the UTF-8 output cannot hold it, and the run stopped
    # there with a traceback. Its line is written in escapes, the others keep their characters.
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    writer = OrderedWriter(out)
    ids = ["東京", json.loads('"a\\ud800"'), "b"]
    for index, custom_id in enumerate(ids):
        writer.put(index, {"custom_id": custom_id})
    text = raw.getvalue().decode("utf-8")
    assert [json.loads(entry)["custom_id"] for entry in text.splitlines()] == ids
    assert '"東京"' in text and '"a\\ud800"' in text


def test_results_held_for_an_earlier_line_are_written_when_the_run_stops() -> None:
    out = io.StringIO()
    writer = OrderedWriter(out)
    writer.put(3, {"n": 3})
    writer.put(1, {"n": 1})
    writer.write_held()
    assert [json.loads(text)["n"] for text in out.getvalue().splitlines()] == [1, 3]


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


def test_ctrl_c_keeps_what_finished_and_exits_130(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the first result is written: that result stays in the output file, the other lines
    do not run, and the command ends with one line and 130 rather than a traceback."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "\n".join(line(f"a{i}", "/v1/completions", {"prompt": "x", "max_tokens": 2}) for i in range(6))
    )
    put = OrderedWriter.put

    def put_then_interrupt(self: OrderedWriter, index: int, result: dict[str, Any]) -> None:
        put(self, index, result)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(OrderedWriter, "put", put_then_interrupt)
    model = str(tiny_model_dir("llama"))
    flags = ["--model", model, "--device", "cpu", "--max-concurrency", "1", "--log-level", "WARNING"]
    assert main(["run-batch", "-i", str(source), "-o", str(target), *flags]) == 130
    results = [json.loads(text) for text in target.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a0"] and results[0]["response"]["status_code"] == 200


def test_a_byte_order_mark_is_accepted_and_a_line_that_is_not_utf8_is_its_own_error(
    tiny_model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    first = line("first", "/v1/completions", {"prompt": "x", "max_tokens": 1}).encode()
    last = line("last", "/v1/completions", {"prompt": "y", "max_tokens": 1}).encode()
    source.write_bytes(b"\xef\xbb\xbf" + first + b'\n{"custom_id": "caf\xe9"}\n' + last + b"\n")
    model = str(tiny_model_dir("llama"))
    flags = ["--model", model, "--device", "cpu", "--log-level", "WARNING"]
    assert main(["run-batch", "-i", str(source), "-o", str(target), *flags]) == 0
    results = [json.loads(text) for text in target.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["first", None, "last"]
    assert results[0]["response"]["status_code"] == results[2]["response"]["status_code"] == 200
    assert results[1]["error"]["code"] == "invalid_json" and "utf-8" in results[1]["error"]["message"]


def test_an_output_that_cannot_take_the_results_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    # A model that cannot load: were the output accepted, the run would end with 1, not 2.
    flags = ["--model", str(tmp_path / "missing-model"), "--device", "cpu", "--log-level", "ERROR"]
    assert main(["run-batch", "-i", str(source), "-o", str(tmp_path), *flags]) == 2
    # The input is read while the results are written: writing over it would lose the requests.
    assert main(["run-batch", "-i", str(source), "-o", str(source), *flags]) == 2
    assert json.loads(source.read_text())["custom_id"] == "a"


def test_standard_input_redirected_from_the_output_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `batchlm run-batch -i - -o requests.jsonl < requests.jsonl` would empty its own input.
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    flags = ["--model", str(tmp_path / "missing-model"), "--device", "cpu", "--log-level", "ERROR"]
    with source.open() as redirected:
        monkeypatch.setattr("sys.stdin", redirected)
        assert main(["run-batch", "-i", "-", "-o", str(source), *flags]) == 2
    assert json.loads(source.read_text())["custom_id"] == "a"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--progress-interval", "0"), ("--progress-interval", "0.001"), ("--max-concurrency", "0")],
)
def test_out_of_range_batch_flags_are_usage_errors(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x"}) + "\n")
    flags = ["--model", str(tmp_path / "missing-model"), "--log-level", "ERROR"]
    with pytest.raises(SystemExit) as exited:
        main(["run-batch", "-i", str(source), "-o", str(tmp_path / "out.jsonl"), flag, value, *flags])
    assert exited.value.code == 2 and flag in capsys.readouterr().err


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


def test_the_batchs_server_answers_the_batch_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local port the batch runs through takes no request without the run's own key: another user
    of the machine cannot use the model while the batch runs."""
    import httpx

    import batchlm.backends
    from batchlm import run_batch
    from fake_engine import FakeEngine

    class BatchEngine(FakeEngine):
        def begin_loading(self) -> None:
            pass

    monkeypatch.setattr(batchlm.backends, "create_engine", lambda backend, config: BatchEngine(ready=False))
    outsider_statuses: list[int] = []
    real_run_lines = run_batch.run_lines

    async def run_after_an_outsider(base_url: str, *args: Any, **kwargs: Any) -> BatchProgress:
        body = {"prompt": "x", "max_tokens": 1}
        outsider = await asyncio.to_thread(httpx.post, f"{base_url}/v1/completions", json=body, timeout=60)
        outsider_statuses.append(outsider.status_code)
        return await real_run_lines(base_url, *args, **kwargs)

    monkeypatch.setattr(run_batch, "run_lines", run_after_an_outsider)
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(line("a", "/v1/completions", {"prompt": "x", "max_tokens": 2}) + "\n")
    assert main(["run-batch", "-i", str(source), "-o", str(target), "--log-level", "ERROR"]) == 0
    assert outsider_statuses == [401]
    [result] = [json.loads(text) for text in target.read_text().splitlines()]
    assert result["response"]["status_code"] == 200


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])], ids=lambda s: s.name
)
def test_a_stop_signal_keeps_what_finished_says_so_and_exits_128_plus_its_number(
    tiny_model_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    signum: signal.Signals,
) -> None:
    """SIGTERM (a scheduler stopping the job) or SIGHUP (the terminal closed) as the first result is
    written: handled as Ctrl-C is, not as a crash (the default action killed the process, losing the
    results held for an earlier line and saying nothing)."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(
        "\n".join(line(f"a{i}", "/v1/completions", {"prompt": "x", "max_tokens": 2}) for i in range(6))
    )
    put = OrderedWriter.put

    def put_then_terminate(self: OrderedWriter, index: int, result: dict[str, Any]) -> None:
        put(self, index, result)
        signal.raise_signal(signum)

    def unhandled(signum: int, frame: object) -> None:
        raise AssertionError("run-batch left the signal to its default action, which kills the process")

    monkeypatch.setattr(OrderedWriter, "put", put_then_terminate)
    previous = signal.signal(signum, unhandled)
    try:
        model = str(tiny_model_dir("llama"))
        flags = ["--model", model, "--device", "cpu", "--max-concurrency", "1", "--log-level", "WARNING"]
        assert main(["run-batch", "-i", str(source), "-o", str(target), *flags]) == 128 + signum
        assert signal.getsignal(signum) is unhandled  # given back
    finally:
        signal.signal(signum, previous)
    results = [json.loads(text) for text in target.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["a0"] and results[0]["response"]["status_code"] == 200
    logged = capfd.readouterr().err
    assert f"run-batch: stopped by {signum.name}: 1/6 requests done" in logged
    assert f"their results are in {target} (complete JSONL lines" in logged


def test_a_line_in_utf16_is_not_read_as_json_would_read_it() -> None:
    # json.loads takes UTF-16 and UTF-32 bytes too: the first line of a UTF-16 file ran, the rest failed.
    text = line("a", "/v1/completions", {"prompt": "x"})
    utf16 = parse_line(b"\xff\xfe" + text.encode("utf-16-le"), set())
    assert isinstance(utf16, dict) and utf16["error"]["code"] == "invalid_json"
    assert utf16["error"]["message"].startswith("the line is not UTF-8")
    utf32 = parse_line(text.encode("utf-32-be"), set())  # valid UTF-8 (NULs), so not JSON
    assert isinstance(utf32, dict) and utf32["error"]["code"] == "invalid_json"
    assert parse_line(b"\xef\xbb\xbf" + text.encode(), set()) == ("a", "/v1/completions", {"prompt": "x"})


@pytest.mark.parametrize("flag", ["-i", "-o"])
def test_an_empty_file_name_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # -o "" was reported as "cannot write : it is a directory" (the current one).
    names = {"-i": "in.jsonl", "-o": "out.jsonl", flag: ""}
    with pytest.raises(SystemExit) as exit_info:
        main(["run-batch", "-i", names["-i"], "-o", names["-o"]])
    assert exit_info.value.code == 2
    assert "must not be empty" in capsys.readouterr().err
