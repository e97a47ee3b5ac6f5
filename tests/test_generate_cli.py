"""`batchlm generate` end to end on a tiny model: text out, JSON out, and argument errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm.cli import main


def test_generate_json_lines(tiny_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dir("llama"))
    code = main(
        [
            "generate",
            "--model",
            model,
            "--device",
            "cpu",
            "--json",
            "--max-tokens",
            "5",
            "--ignore-eos",
            "--n",
            "2",
            "--temperature",
            "1",
            "--sampling-seed",
            "3",
            "hello",
            "world",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["hello", "world"]
    for line in lines:
        assert len(line["completions"]) == 2
        assert all(len(c["token_ids"]) == 5 and c["finish_reason"] == "length" for c in line["completions"])


def test_generate_rejects_bad_sampling_and_missing_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--temperature", "-1", "hi"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "no prompts" in capsys.readouterr().err
