"""`batchlm run-batch`: OpenAI Batch API lines run through the in-process server, results in input
order, lines that cannot run and requests the server refuses each reported on their own line."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchlm.cli import main
from batchlm.run_batch import OrderedWriter, parse_line, run_lines

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
    assert chat_reply["request_id"] == chat_reply["body"]["id"] and by_position[0]["error"] is None
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
    }
    for text, code in refusals.items():
        refused = parse_line(text, seen)
        assert isinstance(refused, dict) and refused["error"]["code"] == code and refused["response"] is None


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
