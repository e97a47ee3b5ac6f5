"""What the tests of `batchlm run-batch` share: a line of an OpenAI Batch API input file."""

from __future__ import annotations

import json
from typing import Any


def line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
