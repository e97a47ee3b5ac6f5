"""Prompt file loading and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchlm.bench.datasets import DatasetError, builtin_samples, estimate_tokens, load_jsonl, load_sharegpt
from batchlm.bench.words import BUILTIN_PROMPTS


def test_builtin_prompts_repeat_like_the_seed() -> None:
    samples = builtin_samples(3)
    assert len(samples) == len(BUILTIN_PROMPTS)
    assert samples[0].prompt == " ".join([BUILTIN_PROMPTS[0]] * 3)


def test_jsonl_accepts_strings_and_objects_with_lengths(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('"just text"\n\n{"prompt": "q", "output_len": 9}\n{"prompt": "r", "output_tokens": 2}\n')
    samples = load_jsonl(str(path))
    assert [(s.prompt, s.output_len) for s in samples] == [("just text", None), ("q", 9), ("r", 2)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok"}\n{broken\n', r"p.jsonl:2: not valid JSON"),
        ('{"text": "no prompt key"}\n', r'p.jsonl:1: expected a string or an object with a string "prompt"'),
        ('{"prompt": "x", "max_tokens": 0}\n', r"p.jsonl:1: the output length must be a positive integer"),
        ("\n\n", r"p.jsonl: no prompts found"),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_jsonl(str(path))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read dataset file"):
        load_jsonl(str(tmp_path / "absent.jsonl"))


def test_a_byte_order_mark_reads_as_the_same_file(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "caf\u00e9"}\n'.encode())
    assert [s.prompt for s in load_jsonl(str(jsonl))] == ["caf\u00e9"]
    sharegpt = tmp_path / "s.json"
    conversation = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    sharegpt.write_bytes(b"\xef\xbb\xbf" + json.dumps([conversation]).encode())
    assert [s.prompt for s in load_sharegpt(str(sharegpt))] == ["hi"]


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.jsonl: not UTF-8 text"):
        load_jsonl(str(path))


def test_sharegpt_takes_first_human_turn_and_estimates_reply_length(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "user", "value": "hi"},
                        {"from": "assistant", "value": "a b c d e f g h i j"},
                    ]
                },
                {
                    "conversations": [
                        {"from": "human", "value": ""},
                        {"from": "gpt", "value": "empty prompt: skipped"},
                    ]
                },
                {"id": "no conversations"},
            ]
        )
    )
    [sample] = load_sharegpt(str(path))
    assert (sample.prompt, sample.output_len) == ("hi", 13)


def test_sharegpt_without_usable_conversations_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_sharegpt(str(path))
    path.write_text("[]")
    with pytest.raises(DatasetError, match="no conversation starts with a human turn"):
        load_sharegpt(str(path))


def test_estimate_tokens_is_at_least_one() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("one two three four five six seven eight nine ten") == 13
