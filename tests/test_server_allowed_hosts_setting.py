"""The --allowed-hosts setting: the default that follows the bind, the bound name, the flag and its
usage errors, and `batchlm serve` handing the resolved check to every API-server process."""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from typing import Any

import pytest
from starlette.testclient import TestClient

from batchlm.cli import main
from batchlm.config import EngineConfig
from batchlm.server import allowed_hosts as hosts
from batchlm.server import cli as serve_cli
from batchlm.server.allowed_hosts import ANY_HOST, AllowedHosts, parse_allowed_hosts, resolve_allowed_hosts
from batchlm.server.app import build_app
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine
from test_server_host_check import REBOUND, assert_refused, exchange


@pytest.mark.parametrize(
    ("bind", "beyond_loopback"),
    [("127.0.0.1", False), ("localhost", False), ("::1", False), ("0.0.0.0", True), ("::", True), ("", True)],
)
def test_the_default_follows_the_bind(bind: str, beyond_loopback: bool) -> None:
    resolved = resolve_allowed_hosts(None, bind)
    assert resolved.any_host == beyond_loopback
    if not beyond_loopback:
        assert resolved.allows("localhost:8080") and not resolved.allows(REBOUND)
        assert resolved.allows(f"[{bind}]:8080" if ":" in bind else f"{bind}:8080")


def test_the_bound_name_itself_is_answered(monkeypatch: Any) -> None:
    # A name of this machine that resolves to loopback only (Debian maps the host name to 127.0.1.1).
    monkeypatch.setattr(hosts, "listens_beyond_loopback", lambda host: False)
    resolved = resolve_allowed_hosts(None, "My-Box.lan")
    assert resolved == AllowedHosts(names=frozenset({"my-box.lan"}))
    assert resolved.allows("my-box.lan:8080") and not resolved.allows("box.lan")
    # Given --allowed-hosts, the bound name is answered too; an every-interface address names no host.
    assert resolve_allowed_hosts(parse_allowed_hosts("a.example"), "10.0.0.7").names == {
        "a.example",
        "10.0.0.7",
    }
    assert resolve_allowed_hosts(parse_allowed_hosts("a.example"), "0.0.0.0").names == {"a.example"}


def test_settings_built_in_code_check_nothing() -> None:
    # Tests and embedding apps build ServerSettings() themselves; `batchlm serve` always resolves it.
    with TestClient(build_app(FakeEngine(), ServerSettings())) as client:
        assert client.get("/health").status_code == 200  # Host: testserver


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_flag_parses() -> None:
    assert parse().allowed_hosts is None
    assert parse("--allowed-hosts", "*").allowed_hosts == ANY_HOST
    assert parse("--allowed-hosts", "A.example, *.b.example,[::1],").allowed_hosts == AllowedHosts(
        names=frozenset({"a.example", "::1"}), parents=frozenset({"b.example"})
    )


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("a.example:8080", "without a port"),
        ("http://a.example", "is not a host name"),
        ("a.*.example", "is not a host name"),
        ("", "give one or more host names"),
    ],
)
def test_a_bad_flag_value_is_a_usage_error_naming_it(value: str, said: str, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--allowed-hosts", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --allowed-hosts: " in err and said in err and err.count("\n") == 1


def test_help_shows_the_flag(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--allowed-hosts ALLOWED_HOSTS" in help_text
    assert "DNS rebinding" in help_text and '"*": any host' in help_text


def serve_captured(monkeypatch: Any, *argv: str) -> dict[str, Any]:
    """`batchlm serve argv` up to the point the server would run; what it was given."""
    captured: dict[str, Any] = {}

    def fake_run_server(app: Any, engine: Any, *, start_engine: Any = None) -> int:
        captured.update(app=app)
        return 0

    def fake_run_several(settings: ServerSettings, config: EngineConfig, count: int) -> int:
        captured.update(settings=settings, count=count)
        return 0

    stub_module = types.ModuleType("batchlm.engine.async_engine")
    stub_module.AsyncLLMEngine = lambda config, *, max_queue=None: FakeEngine()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "batchlm.engine.async_engine", stub_module)
    monkeypatch.setattr("batchlm.server.launcher.run_server", fake_run_server)
    monkeypatch.setattr(serve_cli, "_run_several", fake_run_several)
    monkeypatch.setattr(serve_cli, "configure_logging", lambda level: None)
    monkeypatch.setattr(serve_cli, "raise_open_file_limit", lambda: None)
    assert main(["serve", "--port", "0", "--api-servers", "1", *argv]) == 0
    return captured


def test_serve_on_loopback_refuses_a_rebound_host(monkeypatch: Any) -> None:
    app = serve_captured(monkeypatch)["app"]
    with TestClient(app) as client:
        assert_refused(client.get("/health", headers={"Host": REBOUND}))
        assert client.get("/health", headers={"Host": "127.0.0.1:8080"}).status_code == 200


def test_serve_on_every_interface_answers_any_host_unless_told(monkeypatch: Any) -> None:
    app = serve_captured(monkeypatch, "--host", "0.0.0.0")["app"]
    with TestClient(app) as client:
        assert client.get("/health", headers={"Host": "192.168.1.5:8080"}).status_code == 200
    app = serve_captured(monkeypatch, "--host", "0.0.0.0", "--allowed-hosts", "llm.example")["app"]
    with TestClient(app) as client:
        assert client.get("/health", headers={"Host": "llm.example:8080"}).status_code == 200
        assert_refused(client.get("/health", headers={"Host": REBOUND}))


def test_every_api_server_process_gets_the_resolved_check(monkeypatch: Any) -> None:
    captured = serve_captured(monkeypatch, "--api-servers", "2")
    assert captured["count"] == 2
    # The settings each API-server process is spawned with (ApiServerSpec) and builds its app from.
    settings = pickle.loads(pickle.dumps(captured["settings"]))
    assert settings.allowed_hosts == resolve_allowed_hosts(None, "127.0.0.1")
    with TestClient(build_app(FakeEngine(), settings, log_stats=False)) as client:
        assert_refused(client.get("/health", headers={"Host": REBOUND}))


def test_a_background_server_answers_loopback_names_unless_told_otherwise() -> None:
    """BackgroundServer (run-batch's server, notebooks') listens on 127.0.0.1 as `batchlm serve` does
    by default, and so refuses a rebound name; an explicit setting still wins."""

    def answer(settings: ServerSettings | None, host: bytes) -> bytes:
        with BackgroundServer(FakeEngine(), settings) as server:
            return exchange(
                server.port, b"GET /health HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host
            )

    refused = answer(None, REBOUND.encode())
    assert refused.startswith(b"HTTP/1.1 403 ") and b'"host_not_allowed"' in refused
    assert answer(None, b"localhost:1234").startswith(b"HTTP/1.1 200 ")
    assert answer(ServerSettings(allowed_hosts=ANY_HOST), REBOUND.encode()).startswith(b"HTTP/1.1 200 ")
    named = ServerSettings(allowed_hosts=parse_allowed_hosts("batch.internal"))
    assert answer(named, b"batch.internal").startswith(b"HTTP/1.1 200 ")


def test_international_names_are_answered_as_browsers_send_them() -> None:
    allowed = parse_allowed_hosts("bücher.example, *.straße.example")
    assert allowed.allows("xn--bcher-kva.example:8080") and allowed.allows("api.xn--strae-oqa.example")
    assert not allowed.allows("bucher.example")
    with pytest.raises(ValueError, match="is not a host name"):
        parse_allowed_hosts("bü cher.example")
