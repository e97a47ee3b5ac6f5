"""The command line: the seed client's interface and defaults, vLLM flag names, and flag validation."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchlm.bench import cli
from batchlm.bench.config import BenchConfig, from_args

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> BenchConfig:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_no_flags_means_the_seed_clients_simulated_users() -> None:
    config = parse()
    assert config.base_url == "http://localhost:8080/v1"
    assert config.request_url == "http://localhost:8080/v1/chat/completions"
    assert config.tokenize_url == "http://localhost:8080/tokenize"
    assert config.headers["Authorization"] == "Bearer EMPTY"
    assert (config.model, config.stream, config.api) == ("default_model", False, "chat")
    [load] = config.levels
    assert (load.concurrency, load.request_rate, load.duration_s) == (4, None, None)
    w = config.workload
    assert (w.dataset_name, w.num_requests) == ("builtin", 20)
    assert (w.min_delay, w.max_delay, w.min_tokens, w.max_tokens) == (0.1, 2.0, 10, 512)
    assert (w.output_len, config.ignore_eos, config.include_usage) == (None, False, True)
    assert config.percentiles == [50.0, 90.0, 99.0]


def test_the_seed_readme_example_parses() -> None:
    config = parse("--concurrency", "8", "--requests", "50", "--stream", "--model", "mlx-community/Llama")
    assert (config.levels[0].concurrency, config.workload.num_requests, config.stream) == (8, 50, True)
    assert config.model == "mlx-community/Llama"


def test_full_endpoint_url_is_accepted_as_base_url_like_the_seed() -> None:
    assert parse("--base-url", "http://h:1/v1/chat/completions/").base_url == "http://h:1/v1"
    assert parse("--backend", "openai").request_url == "http://localhost:8080/v1/completions"
    # /responses too: it was kept, and every request went to /v1/responses/responses (a 404).
    responses = parse("--backend", "openai-responses", "--base-url", "http://h:1/v1/responses")
    assert (responses.base_url, responses.request_url) == ("http://h:1/v1", "http://h:1/v1/responses")


def test_benchmark_client_script_takes_exactly_the_seed_flags() -> None:
    script = REPO / "benchmark_client.py"
    seed_help = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--base-url",
        "--api-key",
        "--model",
        "--concurrency",
        "--requests",
        "--stream",
        "--min-delay",
        "--max-delay",
        "--min-tokens",
        "--max-tokens",
    ):
        assert flag in seed_help.stdout
    # Its help names no flag it refuses.
    assert "--duration" not in seed_help.stdout and "--request-rate" not in seed_help.stdout
    for extra in (["--request-rate", "2"], ["--num-prompts", "3"], ["--concurrency", "1,4"]):
        rejected = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True)
        assert rejected.returncode == 2, extra
        assert "error" in rejected.stderr


def test_open_loop_flags_use_vllm_semantics() -> None:
    [load] = parse("--request-rate", "2.5", "--burstiness", "0.5", "--max-concurrency", "8").levels
    assert (load.concurrency, load.request_rate, load.burstiness, load.max_concurrency) == (None, 2.5, 0.5, 8)
    [capped] = parse("--max-concurrency", "16").levels  # alone: all arrivals at once, 16 in flight
    assert capped.request_rate == math.inf and capped.max_concurrency == 16
    config = parse("--request-rate", "2")
    assert (config.workload.min_delay, config.workload.max_delay) == (0.0, 0.0)


def test_sweeps_give_one_level_per_value() -> None:
    config = parse("--concurrency", "1,4,16,64")
    assert [level.concurrency for level in config.levels] == [1, 4, 16, 64]
    assert config.sweep_name == "concurrency"
    rates = parse("--request-rate", "1,inf", "--max-concurrency", "4")
    assert [level.request_rate for level in rates.levels] == [1.0, math.inf]
    assert rates.sweep_name == "request_rate"
    assert parse("--concurrency", "4").sweep_name is None


def test_fixed_length_mode_sends_ignore_eos_and_picks_random_prompts() -> None:
    config = parse("--input-len", "128", "--output-len", "64")
    assert (config.workload.dataset_name, config.workload.input_len, config.workload.output_len) == (
        "random",
        128,
        64,
    )
    assert config.ignore_eos
    assert parse("--dataset-name", "custom", "--dataset-path", "x.jsonl").workload.dataset_name == "jsonl"


def test_duration_mode_uses_a_larger_prompt_pool() -> None:
    config = parse("--duration", "30")
    assert (config.levels[0].duration_s, config.workload.num_requests) == (30.0, 1000)
    assert parse("--duration", "30", "--requests", "7").workload.num_requests == 7


def test_extra_body_headers_and_sampling_flags_reach_the_request() -> None:
    config = parse("--temperature", "0", "--extra-body", '{"top_k": 5, "seed": 1}', "--header", "X-A=1")
    assert config.extra_body == {"temperature": 0.0, "top_k": 5, "seed": 1}
    assert config.headers["X-A"] == "1"
    assert not parse("--no-include-usage").include_usage


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--burstiness", "2"], "--burstiness shapes open-loop arrivals"),
        (["--request-rate", "2", "--concurrency", "4"], "use --max-concurrency"),
        (["--concurrency", "1,2", "--max-concurrency", "1,2"], "sweep one flag at a time"),
        (["--output-len", "8", "--max-tokens", "9"], "--output-len fixes max_tokens"),
        (["--input-len", "8", "--dataset-name", "builtin"], "does not apply to the builtin dataset"),
        (["--dataset-name", "random"], "needs --input-len"),
        (["--dataset-name", "sharegpt"], "needs --dataset-path"),
        (["--min-delay", "3"], "--max-delay must be >= 3"),
        (["--min-tokens", "0"], "--min-tokens must be >= 1"),
        (
            ["--max-tokens", "8"],
            "--max-tokens must be >= 10 (--min-tokens's default; set --min-tokens lower)",
        ),
        (["--min-tokens", "20", "--max-tokens", "8"], "--max-tokens must be >= 20 (--min-tokens)"),
        (["--request-rate", "0"], "--request-rate must be > 0"),
        (["--request-rate", "2", "--min-delay", "1"], "closed-loop think times"),
        (["--concurrency", "four"], "--concurrency: expected comma-separated int"),
        (["--extra-body", "[1]"], "--extra-body must be a JSON object"),
        (["--header", "novalue"], "--header expects KEY=VALUE"),
        (["--metric-percentiles", "50,150"], "not within 0..100"),
        (["--base-url", "localhost:8080/v1"], "must start with http://"),
        (["--client-processes", "0"], "--client-processes must be >= 1"),
        # Accepted before: an infinite think time or duration never ended, NaN passed as no delay,
        # and an infinite request timeout failed with a traceback once the run began.
        (["--max-delay", "inf"], "--max-delay must be a finite number, got inf"),
        (["--min-delay", "nan"], "--min-delay must be a finite number, got nan"),
        (["--duration", "inf"], "--duration must be a finite number, got inf"),
        (["--request-timeout", "inf"], "--request-timeout must be a finite number, got inf"),
        # Each failed every request of the run with a 400 or 404.
        (["--temperature", "-0.5"], "--temperature must be a number at least 0, got -0.5"),
        (["--temperature", "nan"], "--temperature must be a number at least 0, got nan"),
        (["--top-p", "1.5"], "--top-p must be above 0 and at most 1, got 1.5"),
        (["--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
        (["--top-k", "-2"], "--top-k must be at least -1 (-1 and 0: off), got -2"),
        (["--endpoint", "chat/completions"], "--endpoint is a path after --base-url and starts with '/'"),
        # Silently ignored before.
        (["--dataset-path", "prompts.jsonl"], "--dataset-path is read by the jsonl and sharegpt datasets"),
        (["--save-detailed"], "--save-detailed goes into the --save-result file; give --save-result"),
        (["--metadata", "gpu=h100"], "--metadata goes into the --save-result file; give --save-result"),
        (["--goodput", "itl:5"], "--goodput: unknown metric 'itl' in 'itl:5'; use ttft, tpot, e2el"),
        (["--goodput", "e2el:-3"], "--goodput: e2el must be a finite number of milliseconds > 0, got -3"),
        (["--goodput", "e2el:fast"], "--goodput: e2el needs a number of milliseconds, got 'fast'"),
        (["--goodput", "e2el"], "--goodput expects KEY:VALUE (milliseconds), got 'e2el'"),
        (["--goodput", "e2el:5", "--goodput", "e2el:6"], "--goodput: e2el given more than once"),
        (["--goodput", "ttft:500"], "--goodput ttft is measured on streamed responses: add --stream"),
    ],
)
def test_bad_flag_combinations_are_rejected_with_the_flag_named(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(*argv)


def test_goodput_objectives_from_one_flag_or_several() -> None:
    assert parse().goodput == {}
    assert parse("--stream", "--goodput", "ttft:500", "tpot:50").goodput == {"ttft": 500.0, "tpot": 50.0}
    assert parse("--goodput", "e2el:2000", "--stream", "--goodput", "tpot:40").goodput == {
        "e2el": 2000.0,
        "tpot": 40.0,
    }


def test_goodput_without_a_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("--goodput")
    assert exit_info.value.code == 2
    assert "--goodput" in capsys.readouterr().err


def test_run_reports_bad_flags_on_stderr_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["--burstiness", "2"])) == 2
    assert "batchlm bench: error: --burstiness" in capsys.readouterr().err


def test_batchlm_cli_dispatches_bench(capsys: pytest.CaptureFixture[str]) -> None:
    from batchlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--request-rate" in out and "Metric definitions" in out


def test_bench_imports_nothing_else_from_batchlm_and_never_torch() -> None:
    import ast

    package = REPO / "src" / "batchlm" / "bench"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("torch"), f"{path.name} imports {name}"
                if name.startswith("batchlm"):
                    assert name.startswith("batchlm.bench"), f"{path.name} imports {name}"
    modules = [f"batchlm.bench.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"]
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path: Path) -> None:
    # Found only once the run was over, as a traceback, its results lost.
    missing = tmp_path / "missing" / "result.json"
    for flag in ("--save-result", "--plot"):
        with pytest.raises(
            ValueError, match=re.escape(f"{flag} {missing}: {missing.parent} is not a writable")
        ):
            parse(flag, str(missing))
        with pytest.raises(ValueError, match=re.escape(f"{flag} {tmp_path}: it is a directory")):
            parse(flag, str(tmp_path))
    config = parse("--save-result", str(tmp_path / "r.json"), "--save-detailed", "--metadata", "a=b")
    assert (config.save_result, config.save_detailed, config.metadata) == (
        str(tmp_path / "r.json"),
        True,
        {"a": "b"},
    )


def test_the_edges_of_the_sampling_and_load_ranges_are_accepted() -> None:
    config = parse("--temperature", "0", "--top-p", "1", "--top-k", "-1", "--endpoint", "/chat/completions")
    assert config.extra_body == {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
    assert parse("--request-rate", "inf", "--burstiness", "inf").levels[0].burstiness == math.inf
    assert parse("--min-delay", "0", "--max-delay", "0").workload.max_delay == 0.0
