"""OpenAI's Batch API file format as `batchlm run-batch` reads and writes it: input lines (JSONL:
`custom_id`, `method`, `url`, `body`) read one at a time and checked, and result or error lines written
in input order as requests finish out of order."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Any

from batchlm import json_text
from batchlm.unicode_text import encodes

# The endpoints a batch line may name, as OpenAI's Batch API names them.
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def result_line(
    custom_id: str | None, status: int, body: Any, request_id: str | None = None
) -> dict[str, Any]:
    """A request that ran: its HTTP status and body, as the Batch API writes them. `request_id` is the
    response's X-Request-Id, which the Batch API puts there (not the body's id), and which the server's
    log lines for the request name."""
    request_id = request_id or f"req_{uuid.uuid4().hex}"
    response = {"status_code": status, "request_id": request_id, "body": body}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": None,
    }


def error_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A line that could not run."""
    error = {"code": code, "message": message}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}


def parse_line(text: str | bytes, seen: set[str]) -> tuple[str, str, dict[str, Any]] | dict[str, Any]:
    """(custom_id, url, body) of a valid line, else its error line. `seen` collects the custom ids.
    Bytes are decoded as UTF-8 (a BOM accepted; not as json.loads would, which also takes UTF-16 and
    UTF-32): a line that is not UTF-8 is that line's error rather than the end of the run."""
    try:
        # The line's object is one level around its body, which may nest as deep as a request body.
        item = json_text.loads(
            text.decode("utf-8-sig") if isinstance(text, bytes) else text, json_text.MAX_DEPTH + 1
        )
    except UnicodeDecodeError as error:
        return error_line(None, "invalid_json", f"the line is not UTF-8: {error}")
    except json_text.NestingTooDeep:
        too_deep = f"its arrays or objects nest more than {json_text.MAX_DEPTH} levels inside the line's own"
        return error_line(None, "invalid_json", f"the line is not JSON that can be read: {too_deep}")
    except ValueError as error:
        return error_line(None, "invalid_json", f"the line is not JSON: {error}")
    if not isinstance(item, dict):
        return error_line(None, "invalid_request", "a line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return error_line(None, "invalid_request", "'custom_id' must be a non-empty string")
    if custom_id in seen:
        return error_line(
            custom_id, "duplicate_custom_id", f"'custom_id' {custom_id!r} is used by an earlier line"
        )
    seen.add(custom_id)
    url, body = item.get("url"), item.get("body")
    if item.get("method", "POST") != "POST":
        return error_line(custom_id, "invalid_request", "'method' must be POST")
    if url not in BATCH_URLS:
        return error_line(
            custom_id, "invalid_url", f"'url' must be one of {', '.join(BATCH_URLS)}; got {url!r}"
        )
    if not isinstance(body, dict):
        return error_line(custom_id, "invalid_request", "'body' must be a JSON object")
    if body.get("stream"):
        return error_line(custom_id, "invalid_request", "'stream' is not supported in a batch")
    return custom_id, url, body


def json_line(line: dict[str, Any]) -> str:
    """`line` as one line of JSON, characters as they are; where it holds a lone UTF-16 surrogate (a
    custom_id the input spelled "\\ud800", which json.loads takes) all of it as ASCII escapes instead,
    since the surrogate itself cannot be written as UTF-8 and the escape reads back as the same id."""
    text = json.dumps(line, ensure_ascii=False)
    return (text if encodes(text) else json.dumps(line)) + "\n"


class OutputWriteError(Exception):
    """The results could not be written (a full disk, a closed pipe): the run stops there."""


class OrderedWriter:
    """Writes result lines in input order as they complete out of order."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._waiting: dict[int, dict[str, Any]] = {}
        # The first line not written yet.
        self.next = 0
        # Why writing failed; from then on nothing more is written.
        self.failure: OSError | None = None

    def put(self, index: int, line: dict[str, Any]) -> None:
        if self.failure is not None:
            return
        self._waiting[index] = line
        try:
            while self.next in self._waiting:
                self._out.write(json_line(self._waiting[self.next]))
                del self._waiting[self.next]
                self.next += 1
            self._out.flush()
        except OSError as error:  # kept for run_lines to stop on: a request's task cannot raise to it
            self.failure = error

    def write_held(self) -> None:
        """Writes the lines still waiting for an earlier one that will not come (the run was
        interrupted), in input order: every finished request's result is kept."""
        for index in sorted(self._waiting):
            self._out.write(json_line(self._waiting.pop(index)))
        self._out.flush()


def request_lines(source: Iterable[bytes]) -> Iterator[bytes]:
    """The non-blank lines of a batch file, read one at a time."""
    return (line for line in source if line.strip())


def count_requests(path: str) -> int | None:
    """The non-blank lines of a regular file (for the progress lines); None for a pipe or stdin."""
    if path == "-" or not os.path.isfile(path):
        return None
    with open(path, "rb") as source:
        return sum(1 for _ in request_lines(source))
