"""The web chat page's routes: / and /ui/ serve the packaged files, open even on a keyed server, and
--no-ui leaves / a JSON 404. (What the page does in a browser: test_chat_page_browser.py.)"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from importlib import resources

import httpx
import pytest

from batchlm.server import cli as serve_cli
from batchlm.server.background import BackgroundServer
from batchlm.server.state import ServerSettings
from fake_engine import FakeEngine

UI_FILES = (
    "index.html",
    "chat.js",
    "chat.css",
    "markdown.js",
    "api.js",
    "store.js",
    "view.js",
    "settings_form.js",
)


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-page")) as running:
        yield running


def test_the_page_and_its_files_are_served_without_the_key(keyed_server: BackgroundServer) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=30) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert http.head("/").status_code == 200
        for name in UI_FILES[1:]:
            response = http.get(f"/ui/{name}")
            assert response.status_code == 200, name
            assert response.headers["cache-control"] == "no-cache"
        script_type = http.get("/ui/chat.js").headers["content-type"]
        assert script_type.startswith(("text/javascript", "application/javascript"))
        assert http.get("/ui/chat.css").headers["content-type"].startswith("text/css")
        assert http.get("/v1/models").status_code == 401  # the API itself still needs the key


def test_every_file_the_page_refers_to_exists(keyed_server: BackgroundServer) -> None:
    """index.html's assets and every module import resolve (a renamed file would break the page)."""
    ui = resources.files("batchlm.server").joinpath("ui")
    page = ui.joinpath("index.html").read_text(encoding="utf-8")
    referred = set(re.findall(r'(?:src|href)="/ui/([\w.]+)"', page))
    for name in UI_FILES:
        if name.endswith(".js"):
            referred |= set(re.findall(r'from "\./([\w.]+)"', ui.joinpath(name).read_text(encoding="utf-8")))
    assert referred == set(UI_FILES) - {"index.html"}
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", page)  # nothing from another host: works offline


def test_unknown_ui_files_are_404(keyed_server: BackgroundServer) -> None:
    assert httpx.get(f"{keyed_server.base_url}/ui/missing.js").status_code == 404
    assert httpx.get(f"{keyed_server.base_url}/ui/%2e%2e/state.py").status_code == 404


def test_no_ui_leaves_root_a_json_404() -> None:
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    settings = serve_cli.settings_from_args(parser.parse_args(["--no-ui"]))
    assert settings.ui is False
    assert serve_cli.settings_from_args(parser.parse_args([])).ui is True
    with BackgroundServer(FakeEngine(), settings) as server:
        root = httpx.get(f"{server.base_url}/")
        assert root.status_code == 404
        assert root.headers["content-type"] == "application/json"
        assert httpx.get(f"{server.base_url}/ui/chat.js").status_code == 404
        assert httpx.get(f"{server.base_url}/health").status_code == 200
