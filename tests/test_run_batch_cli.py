"""`batchlm run-batch` end to end: OpenAI Batch API lines run through the in-process server, results
in input order, lines that cannot run and requests the server refuses each reported on their own
line; inputs, outputs and flags refused before the model loads; Ctrl-C and stop signals keeping what
finished; a server that answers the batch alone."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batch_harness import line
from batchlm.batch_file import OrderedWriter
from batchlm.cli import main
from batchlm.run_batch import BatchProgress

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


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


@pytest.mark.parametrize("flag", ["-i", "-o"])
def test_an_empty_file_name_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # -o "" was reported as "cannot write : it is a directory" (the current one).
    names = {"-i": "in.jsonl", "-o": "out.jsonl", flag: ""}
    with pytest.raises(SystemExit) as exit_info:
        main(["run-batch", "-i", names["-i"], "-o", names["-o"]])
    assert exit_info.value.code == 2
    assert "must not be empty" in capsys.readouterr().err
