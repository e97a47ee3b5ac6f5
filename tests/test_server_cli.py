"""`batchlm serve` flags: generated from EngineConfig / ServerSettings, seed spellings and defaults, wiring."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import types
from dataclasses import dataclass, fields
from typing import Any

import pytest

from batchlm.cli import main
from batchlm.config import EngineConfig
from batchlm.flags import field_comments
from batchlm.server import cli as serve_cli
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_build_the_default_configs() -> None:
    args = parse()
    assert serve_cli.dataclass_from_args(EngineConfig, args) == EngineConfig()
    assert serve_cli.settings_from_args(args) == ServerSettings()


def test_seed_flags_and_defaults() -> None:
    args = parse()
    assert (args.model, args.adapter_path, args.host, args.port) == ("demo", None, "127.0.0.1", 8080)
    assert (args.max_num_seqs, args.log_level) == (32, "INFO")
    args = parse(
        "--model", "m", "--adapter-path", "a", "--host", "0.0.0.0", "--port", "9000", "--batch-size", "4"
    )
    assert (args.model, args.adapter_path, args.host, args.port, args.max_num_seqs) == (
        "m",
        "a",
        "0.0.0.0",
        9000,
        4,
    )
    assert parse("--log-level", "DEBUG").log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parse("--log-level", "LOUD")


def test_engine_flags_map_onto_engine_config() -> None:
    args = parse(
        "--max-num-seqs", "8", "--no-prefix-caching", "--enforce-eager", "--trust-remote-code",
        "--max-model-len", "2048", "--max-num-batched-tokens", "512", "--gpu-memory-utilization", "0.5",
        "--cpu-kv-cache-gib", "1.5", "--dtype", "bfloat16", "--device", "cpu", "--block-size", "32",
        "--seed", "3", "--tensor-parallel-size", "2", "--served-model-name", "tiny", "--chat-template", "t.jinja",
        "--hf-overrides", '{"num_hidden_layers": 1}',
    )  # fmt: skip
    config = serve_cli.dataclass_from_args(EngineConfig, args)
    assert config == EngineConfig(
        max_num_seqs=8, enable_prefix_caching=False, enforce_eager=True, trust_remote_code=True,
        max_model_len=2048, max_num_batched_tokens=512, gpu_memory_utilization=0.5, cpu_kv_cache_gib=1.5,
        dtype="bfloat16", device="cpu", block_size=32, seed=3, tensor_parallel_size=2, served_model_name="tiny",
        chat_template="t.jinja", hf_overrides={"num_hidden_layers": 1},
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [["--hf-overrides", "{nope"], ["--hf-overrides", "[1]"], ["--dtype", "int3"], ["--max-queue", "many"]],
)
def test_bad_values_are_rejected_by_argparse(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)


def test_max_queue_none_lifts_the_limit_as_its_help_says() -> None:
    assert serve_cli.settings_from_args(parse("--max-queue", "none")).max_queue is None
    assert serve_cli.settings_from_args(parse("--max-queue", "None")).max_queue is None
    assert serve_cli.settings_from_args(parse("--max-queue", "0")).max_queue == 0
    # A field whose default is None takes no such spelling: `none` there is no value at all.
    with pytest.raises(SystemExit):
        parse("--max-model-len", "none")


def test_a_help_that_offers_none_takes_it() -> None:
    # --max-connections' help offered `none`, which the parser refused (its default is None).
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    offering = [action for action in parser._actions if "`none`" in (action.help or "")]
    assert offering
    for action in offering:
        assert callable(action.type) and action.type("none") is None, action.option_strings


def test_an_empty_default_is_shown_as_one() -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    [root_path] = [action for action in parser._actions if action.dest == "root_path"]
    assert root_path.help is not None and root_path.help.endswith('(default: "")')


def test_a_negative_max_queue_is_refused_at_start(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-queue", "-1"])
    assert exit_info.value.code == 2
    assert "argument --max-queue: must be at least 0 (or none), got -1" in capsys.readouterr().err


def test_every_config_field_has_a_flag_with_its_comment_as_help() -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    dests = {action.dest for action in parser._actions}
    for cls in (EngineConfig, ServerSettings):
        comments = field_comments(cls)
        for spec in fields(cls):
            assert spec.name in dests
            assert spec.name in comments, f"{cls.__name__}.{spec.name} has no comment to use as help"
            first_words = " ".join(comments[spec.name].split()[1:4])
            assert first_words in help_text


def test_field_comments_reads_the_lines_above_each_field() -> None:
    @dataclass
    class Example:
        # First line,
        # second line.
        alpha: int = 1
        beta: str = "x"  # trailing comments are not help
        # Gamma.
        gamma: float = 0.5

    assert field_comments(Example) == {"alpha": "First line, second line.", "gamma": "Gamma."}


def test_api_key_comes_from_the_flag_or_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("BATCHLM_API_KEY", "from-env")
    assert serve_cli.settings_from_args(parse()).api_key == "from-env"
    assert serve_cli.settings_from_args(parse("--api-key", "from-flag")).api_key == "from-flag"
    monkeypatch.delenv("BATCHLM_API_KEY")
    assert serve_cli.settings_from_args(parse()).api_key is None


def test_serve_builds_the_engine_and_runs_the_server(monkeypatch: Any) -> None:
    created: dict[str, Any] = {}

    class StubEngine(FakeEngine):
        def __init__(self, config: EngineConfig, *, max_queue: int | None = None) -> None:
            super().__init__(ready=False)
            created.update(config=config, max_queue=max_queue)

    def fake_run_server(app: Any, engine: Any, *, start_engine: Any = None) -> int:
        created.update(app=app, engine=engine, start_engine=start_engine)
        return 0

    stub_module = types.ModuleType("batchlm.engine.async_engine")
    stub_module.AsyncLLMEngine = StubEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "batchlm.engine.async_engine", stub_module)
    monkeypatch.setattr("batchlm.server.launcher.run_server", fake_run_server)
    # Logging set-up is global state: record the level instead of reconfiguring the test session.
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: created.update(log_level=level))
    # So is the open-file limit (it would stay raised for every later test).
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    # --port 0: the port is tried before the engine loads, and 8080 may be taken on this machine.
    argv = ["serve", "--port", "0", "--batch-size", "4", "--max-queue", "7", "--api-key", "k"]
    assert main([*argv, "--log-level", "WARNING"]) == 0
    assert created["log_level"] == "WARNING"
    assert created["config"].max_num_seqs == 4
    assert created["max_queue"] == 7
    assert created["start_engine"] == created["engine"].start
    state = created["app"].state.batchlm
    assert (state.engine, state.settings.api_key, state.settings.max_queue) == (created["engine"], "k", 7)
    # The port the system picked for --port 0, which the start-up line names too (not ":0").
    assert 0 < state.settings.port <= 65535


def test_an_unavailable_backend_is_an_error_not_a_crash(monkeypatch: Any, caplog: Any) -> None:
    monkeypatch.setattr("batchlm.backends.mlx_available", lambda: False)
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    assert parse("--backend", "mlx").backend == "mlx"
    assert main(["serve", "--backend", "mlx"]) == 2
    assert "mlx" in caplog.text
    with pytest.raises(SystemExit):
        parse("--backend", "tpu")


def test_max_connections_past_the_open_file_limit_is_warned_about(monkeypatch: Any, caplog: Any) -> None:
    # Past the limit, connections are dropped unanswered: the 503 the flag promises never comes.
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    monkeypatch.setattr(serve_cli, "connection_limit", lambda: 960)
    monkeypatch.setattr("batchlm.backends.mlx_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert main(["serve", "--backend", "mlx", "--max-connections", "960"]) == 2
        assert "--max-connections" not in caplog.text
        assert main(["serve", "--backend", "mlx", "--max-connections", "5000"]) == 2
    assert "--max-connections 5000 is more than the 960 connections the open-file limit" in caplog.text


def test_python_dash_m_batchlm_is_the_command() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "batchlm", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--max-queue" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
        (["--port", "-1"], "argument --port: must be from 0 to 65535, got -1"),
        (["--port", "http"], "argument --port: expected an integer, got 'http'"),
        (["--stats-log-interval", "0"], "argument --stats-log-interval: must be at least 0.1, got 0"),
        (["--stats-log-interval", "0.001"], "argument --stats-log-interval: must be at least 0.1, got 0.001"),
        (["--shutdown-timeout", "inf"], "argument --shutdown-timeout: expected a finite number, got 'inf'"),
        (["--shutdown-timeout", "-1"], "argument --shutdown-timeout: must be at least 0, got -1"),
        (["--max-body-bytes", "0"], "argument --max-body-bytes: must be at least 1, got 0"),
        (["--body-timeout", "0"], "argument --body-timeout: must be above 0, got 0"),
        (["--header-timeout", "0"], "argument --header-timeout: must be above 0, got 0"),
        (["--keep-alive-timeout", "0"], "argument --keep-alive-timeout: must be above 0, got 0"),
        (["--max-header-bytes", "0"], "argument --max-header-bytes: must be at least 1024, got 0"),
        (["--max-header-bytes", "10"], "argument --max-header-bytes: must be at least 1024, got 10"),
        (["--max-connections", "0"], "argument --max-connections: must be at least 1, got 0"),
        (["--max-n", "0"], "argument --max-n: must be from 1 to 128, got 0"),
        (["--max-n", "129"], "argument --max-n: must be from 1 to 128, got 129"),
        (["--api-servers", "0"], "argument --api-servers: must be at least 1, got 0"),
        (["--stored-responses", "-1"], "argument --stored-responses: must be at least 0, got -1"),
        (["--batch-size", "0"], "argument --batch-size/--max-num-seqs: must be at least 1, got 0"),
        (["--max-model-len", "0"], "argument --max-model-len: must be at least 1, got 0"),
        (["--max-num-batched-tokens", "0"], "argument --max-num-batched-tokens: must be at least 1, got 0"),
        (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size: must be at least 1, got 0"),
        (["--gpu-memory-utilization", "1.5"], "must be above 0 and at most 1, got 1.5"),
        (["--gpu-memory-utilization", "nan"], "expected a finite number, got 'nan'"),
        (["--cpu-kv-cache-gib", "0"], "argument --cpu-kv-cache-gib: must be above 0, got 0"),
        (["--max-queue", "lots"], "argument --max-queue: expected an integer or \"none\", got 'lots'"),
        (["--seed", str(2**64)], f"argument --seed: must be from {-(2**63)} to {2**64 - 1}, got {2**64}"),
        (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
        # Empty names and paths: an unset shell variable, taken before as the flag left out (an open
        # server for --api-key) or as the current directory.
        (["--api-key", ""], "argument --api-key: must not be empty"),
        (["--model", ""], "argument --model: must not be empty"),
        (["--served-model-name", " "], "argument --served-model-name: must not be empty"),
        (["--generation-config", ""], "argument --generation-config: must not be empty"),
        (["--responses-dir", ""], "argument --responses-dir: must not be empty"),
        (["--dtype", ""], "argument --dtype: must not be empty"),
        # Flags the rest of the line makes meaningless, silently ignored before.
        (
            ["--speculative", "off", "--num-speculative-tokens", "3"],
            "--num-speculative-tokens applies to --speculative auto and ngram, not to --speculative off",
        ),
        (
            ["--speculative", "off", "--speculative-pool-tokens", "0"],
            "--speculative-pool-tokens applies to --speculative auto and ngram, not to --speculative off",
        ),
        (
            ["--speculative", "ngram", "--speculative-max-batch", "8"],
            "--speculative-max-batch applies to --speculative auto, not to --speculative ngram",
        ),
    ],
)
def test_out_of_range_values_are_one_line_usage_errors_before_anything_starts(
    argv: list[str], message: str, monkeypatch: Any, capsys: Any
) -> None:
    def started(_: argparse.Namespace) -> int:
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(serve_cli, "run", started)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "usage:" not in error and "Traceback" not in error, error
    assert error.startswith("batchlm serve: error: ") and message in error, error


def test_the_edge_values_of_each_range_are_accepted() -> None:
    args = parse(
        "--port", "0", "--max-queue", "0", "--shutdown-timeout", "0", "--stored-responses", "0",
        "--gpu-memory-utilization", "1", "--speculative-max-batch", "0", "--speculative-pool-tokens", "0",
    )  # fmt: skip
    assert (args.port, args.max_queue, args.shutdown_timeout_s, args.stored_responses) == (0, 0, 0.0, 0)
    assert (args.gpu_memory_utilization, args.speculative_max_batch, args.speculative_pool_tokens) == (
        1,
        0,
        0,
    )
    args = parse(
        "--max-header-bytes", "1024", "--stats-log-interval", "0.1", "--seed", "-5", "--host", "",
        "--root-path", "", "--block-size", "7",
    )  # fmt: skip
    assert (args.max_header_bytes, args.stats_log_interval_s, args.seed) == (1024, 0.1, -5)
    assert (args.host, args.root_path, args.block_size) == ("", "", 7)
    assert parse("--seed", str(2**64 - 1), "--seed", str(-(2**63))).seed == -(2**63)
    assert serve_cli.check_args(parse("--speculative", "ngram", "--num-speculative-tokens", "3")) is None


def test_the_help_states_each_bounded_flags_range() -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for stated in (
        "(default: 8080; from 0 to 65535)",
        "(default: 65536; at least 1024)",
        "(default: 0.9; above 0 and at most 1)",
        "(default: 16; at least 1)",
        "need not be a power of two",
    ):
        assert stated in help_text


def test_a_responses_dir_that_cannot_be_used_is_one_error_line_before_the_engine_starts(
    tmp_path: Any, monkeypatch: Any, caplog: Any
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")

    def create_engine(*_: Any, **__: Any) -> None:
        raise ValueError("the engine was asked for")  # reported by `serve` as an error, exit status 2

    monkeypatch.setattr(serve_cli, "create_engine", create_engine)
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--responses-dir", str(not_a_directory / "responses")]) == 2
    [record] = caplog.records
    assert record.getMessage().startswith(f"--responses-dir {not_a_directory / 'responses'}: cannot keep")
    assert record.exc_info is None
    caplog.clear()
    # With nothing to store, the directory is not used.
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--responses-dir", str(not_a_directory), "--stored-responses", "0"]) == 2
    assert [record.getMessage() for record in caplog.records] == ["the engine was asked for"]


def test_a_port_in_use_is_one_error_line_before_the_model_loads(monkeypatch: Any, caplog: Any) -> None:
    class StubEngine(FakeEngine):
        def __init__(self, config: EngineConfig, *, max_queue: int | None = None) -> None:
            super().__init__(ready=False)

        def begin_loading(self) -> None:
            raise AssertionError("the model began loading")

    stub_module = types.ModuleType("batchlm.engine.async_engine")
    stub_module.AsyncLLMEngine = StubEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "batchlm.engine.async_engine", stub_module)
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    with socket.create_server(("127.0.0.1", 0)) as taken, caplog.at_level(logging.ERROR):
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    [record] = caplog.records
    assert record.getMessage().startswith(f"cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in record.getMessage()


def test_an_empty_host_listens_on_every_interface() -> None:
    # --host "" is taken (as uvicorn takes it) for every interface; the probe bind refused it as a
    # name that does not resolve, so the server exited before the model loaded.
    from batchlm.server.listener import bind_listener

    with bind_listener("", 0) as sock:
        host, port = sock.getsockname()[:2]
        assert port > 0 and host in ("0.0.0.0", "::")
        with socket.create_connection(("127.0.0.1" if host == "0.0.0.0" else "::1", port), timeout=30):
            pass


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8080"),
        ("::1", "http://[::1]:8080"),
        ("::", "http://[::]:8080"),
        ("", "http://0.0.0.0:8080"),
    ],
)
def test_the_start_up_line_names_a_url_that_works(host: str, url: str, caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="batchlm.server.cli"):
        serve_cli._log_serving(EngineConfig(), ServerSettings(host=host, port=8080))
    assert f" on {url} (" in caplog.text


@pytest.mark.parametrize(
    ("host", "api_key", "warned"),
    [
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("0.0.0.0", "sk-x", False),
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
    ],
)
def test_serving_other_hosts_without_a_key_is_warned_about(
    host: str, api_key: str | None, warned: bool, caplog: Any
) -> None:
    with caplog.at_level(logging.INFO, logger="batchlm.server.cli"):
        serve_cli._log_serving(EngineConfig(), ServerSettings(host=host, port=8080, api_key=api_key))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "--api-key" in warnings[0] and "BATCHLM_API_KEY" in warnings[0]


def test_a_root_path_that_is_not_a_path_is_one_error_line_before_the_engine_starts(
    monkeypatch: Any, caplog: Any
) -> None:
    def create_engine(*_: Any, **__: Any) -> None:
        raise AssertionError("the engine was asked for")

    monkeypatch.setattr(serve_cli, "create_engine", create_engine)
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--root-path", "llm"]) == 2
    [record] = caplog.records
    assert record.getMessage().startswith("--root-path 'llm' is not a URL path prefix")
