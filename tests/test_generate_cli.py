"""`batchlm generate` end to end on a tiny model: text out, JSON out, and argument errors."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlm.cli import main
from batchlm.engine import llm as llm_module


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


@pytest.mark.parametrize(
    ("flag", "value", "accepted"),
    [
        ("--temperature", "-1", "from 0 to 100"),
        ("--top-p", "0", "above 0 and at most 1"),
        ("--top-k", "-2", "at least -1"),
        ("--n", "129", "from 1 to 128"),
        ("--max-tokens", "0", "at least 1"),
    ],
)
def test_a_sampling_flag_out_of_range_is_a_usage_error_naming_it(
    flag: str, value: str, accepted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Refused as the command line is parsed, naming the flag, with the range --help states.
    with pytest.raises(SystemExit) as exited:
        main(["generate", flag, value, "hi"])
    assert exited.value.code == 2
    assert f"argument {flag}: must be {accepted}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert accepted in " ".join(capsys.readouterr().out.split())


def test_generate_rejects_missing_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate"]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_a_prompts_file_that_cannot_be_read_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.txt"
    assert main(["generate", "--prompts-file", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"batchlm generate: cannot read --prompts-file {missing}: ")
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00 not text\n")
    assert main(["generate", "--prompts-file", str(binary)]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith(f"batchlm generate: cannot read --prompts-file {binary}: ")
        and error.count("\n") == 1
    )


@pytest.mark.parametrize(("generation_config", "same"), [("auto", False), ("none", True)])
def test_generate_samples_as_the_model_recommends_unless_told_otherwise(
    tiny_model_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    generation_config: str,
    same: bool,
) -> None:
    # The model recommends temperature 1: two completions of one prompt then differ (a random tiny
    # model's next-token distribution is near uniform); without its recommendation, both are greedy.
    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "eos_token_id": 2}))
    args = ["generate", "--model", str(model), "--device", "cpu", "--json", "--max-tokens", "8"]
    args += ["--ignore-eos", "--n", "2", "--generation-config", generation_config, "hello"]
    assert main(args) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, second = (c["token_ids"] for c in line["completions"])
    assert (first == second) is same


def test_generate_reports_a_prompt_the_model_cannot_take(
    tiny_model_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_model_dir("llama"))
    assert main(["generate", "--model", model, "--device", "cpu", "--max-tokens", "100000", "hi"]) == 2
    assert "maximum context length" in capsys.readouterr().err
    assert main(["generate", "--model", str(Path(model) / "missing"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_model_directory_holding_no_model_is_one_error_line_naming_what_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tokenizer's error came first, listing tokenizer formats and sentencepiece over five lines.
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["generate", "--model", str(tmp_path), "--device", "cpu", "hi"]) == 2
    error = capsys.readouterr().err
    assert (
        error
        == f"batchlm generate: model directory {str(tmp_path)!r} holds neither config.json nor a GGUF file\n"
    )


def test_a_damaged_weight_file_is_one_error_line(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = shutil.copytree(tiny_model_dir("llama"), tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["generate", "--model", str(model), "--device", "cpu", "hi"]) == 2
    error = capsys.readouterr().err
    assert f"{weights} is not a readable safetensors file" in error
    assert "Traceback" not in error


def test_an_unwritable_cache_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unwritable(config: object, cancel: object = None) -> Path:
        raise OSError("cannot write the model cache /ro; set BATCHLM_CACHE to a writable directory")

    monkeypatch.setattr(llm_module, "prepare_model_dir", unwritable)
    assert main(["generate", "--device", "cpu", "hi"]) == 1
    assert capsys.readouterr().err == (
        "batchlm generate: cannot write the model cache /ro; set BATCHLM_CACHE to a writable directory\n"
    )


def test_ctrl_c_while_the_model_loads_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(config: object, cancel: object = None) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_module, "prepare_model_dir", interrupted)
    try:
        code = main(["generate", "--device", "cpu", "hi"])
    except KeyboardInterrupt:  # escaping, it would stop the test run itself
        pytest.fail("KeyboardInterrupt escaped `batchlm generate`")
    assert code == 130
    assert capsys.readouterr().err == "batchlm generate: interrupted\n"


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])], ids=lambda s: s.name
)
def test_a_stop_signal_ends_generate_as_ctrl_c_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: signal.Signals
) -> None:
    # Their default action ended the process with no word, and with tensor parallel its workers'
    # semaphores were left to multiprocessing's resource tracker, which warned of leaks.
    def stopped(config: object, cancel: object = None) -> Path:
        signal.raise_signal(signum)
        raise AssertionError("the signal was not taken as an interrupt")

    def unhandled(signum: int, frame: object) -> None:
        raise AssertionError("batchlm generate left the signal to the handler it found")

    monkeypatch.setattr(llm_module, "prepare_model_dir", stopped)
    previous = signal.signal(signum, unhandled)
    try:
        assert main(["generate", "--device", "cpu", "hi"]) == 128 + signum
        assert signal.getsignal(signum) is unhandled  # given back
    finally:
        signal.signal(signum, previous)
    assert capsys.readouterr().err == f"batchlm generate: stopped by {signum.name}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompts-file", "", "hi"], "argument --prompts-file: must not be empty"),
        (["--chat-template", "{{ x }}", "hi"], "--chat-template formats --chat prompts"),
        (["--seed", str(10**23), "hi"], "argument --seed: must be from"),
        (
            ["--speculative", "off", "--num-speculative-tokens", "3", "hi"],
            "--num-speculative-tokens applies to --speculative auto and ngram",
        ),
    ],
)
def test_flags_that_cannot_work_together_or_at_all_are_usage_errors_before_the_model_loads(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # --seed 1e23 failed with "Overflow when unpacking long long" once the model had loaded.
    monkeypatch.setattr(llm_module, "LLM", lambda **_: pytest.fail(f"{argv} loaded a model"))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("batchlm generate: error: ") and message in error and error.count("\n") == 1
