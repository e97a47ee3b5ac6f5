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
from batchlm.server.root_path import checked_root_path
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
    # Named relative to the page, so that it works behind a proxy's path prefix too.
    referred = set(re.findall(r'(?:src|href)="ui/([\w.]+)"', page))
    for name in UI_FILES:
        if name.endswith(".js"):
            referred |= set(re.findall(r'from "\./([\w.]+)"', ui.joinpath(name).read_text(encoding="utf-8")))
    assert referred == set(UI_FILES) - {"index.html"}
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", page)  # nothing from another host: works offline
    assert not re.search(r'(?:src|href)="/', page)


@pytest.mark.parametrize(
    ("announced", "prefix"),
    [("/llm", "/llm"), ("/llm/", "/llm"), ("/a/b-c", "/a/b-c"), ("//evil.example", ""), ('/x"><script>', "")],
)
def test_the_page_names_its_files_under_an_announced_prefix(
    keyed_server: BackgroundServer, announced: str, prefix: str
) -> None:
    """Traefik's StripPrefix announces the prefix it took (X-Forwarded-Prefix): the page served for
    https://host/llm (no slash, where relative names would miss) names its files under it. One that
    is not a plain path is ignored rather than written into the page."""
    with httpx.Client(base_url=keyed_server.base_url, timeout=30) as http:
        page = http.get("/", headers={"X-Forwarded-Prefix": announced})
        assert page.headers["vary"] == "X-Forwarded-Prefix"
        named = set(re.findall(r'(?:src|href)="([^"]*)"', page.text)) - {"data:,"}
        assert (
            named == {f"{prefix}/ui/chat.css", f"{prefix}/ui/chat.js"}
            if prefix
            else {"ui/chat.css", "ui/chat.js"}
        )
        docs = http.get("/docs", headers={"X-Forwarded-Prefix": announced}).text
        assert f"url: '{prefix}/openapi.json'" in docs


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


PREFIX_KEY = {"Authorization": "Bearer sk-page"}


@pytest.fixture(scope="module")
def prefixed_server() -> Iterator[BackgroundServer]:
    with BackgroundServer(FakeEngine(), ServerSettings(api_key="sk-page", root_path="/llm/")) as running:
        yield running


@pytest.mark.parametrize("prefix", ["/llm", ""], ids=["passed-on", "stripped"])
def test_root_path_serves_what_a_proxy_passes_on_stripped_or_not(
    prefixed_server: BackgroundServer, prefix: str
) -> None:
    """--root-path /llm, as uvicorn's and vLLM's: a proxy may pass /llm/v1/models on as it is or strip
    it to /v1/models; both are served, the key still guards the API, and the pages name their files
    and the API under the prefix."""
    with httpx.Client(base_url=prefixed_server.base_url, timeout=30) as http:
        for page_path in {f"{prefix}/", prefix or "/"}:
            page = http.get(page_path)
            assert page.status_code == 200, page_path
            assert 'href="/llm/ui/chat.css"' in page.text and 'src="/llm/ui/chat.js"' in page.text
        assert http.get(f"{prefix}/ui/chat.js").status_code == 200
        assert http.get(f"{prefix}/health").json() == {"status": "ok"}
        assert http.get(f"{prefix}/v1/models").status_code == 401
        assert http.post(f"{prefix}/tokenize", json={"prompt": "hi"}).status_code == 401
        assert http.get(f"{prefix}/v1/models", headers=PREFIX_KEY).json()["data"][0]["id"] == "fake-model"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        for route in ("/v1/chat/completions", "/v1/chat/completions/"):
            reply = http.post(f"{prefix}{route}", json=body, headers=PREFIX_KEY)
            assert reply.status_code == 200 and reply.json()["object"] == "chat.completion", route
        assert http.post(f"{prefix}/v1/chat/completions", json=body).status_code == 401
        assert http.get(f"{prefix}/openapi.json").json()["servers"] == [{"url": "/llm"}]
        assert "url: '/llm/openapi.json'" in http.get(f"{prefix}/docs").text
        missing = http.get(f"{prefix}/v1/nothing", headers=PREFIX_KEY)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"


@pytest.mark.parametrize(
    ("given", "root"), [("", ""), ("/", ""), ("/llm", "/llm"), ("/llm/", "/llm"), ("/a/b.c", "/a/b.c")]
)
def test_root_path_is_a_path_prefix(given: str, root: str) -> None:
    assert checked_root_path(given) == root


@pytest.mark.parametrize("given", ["llm", "//evil.example", '/x"y', "/a//b", "/llm?x=1"])
def test_a_root_path_that_is_not_a_path_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match="--root-path"):
        checked_root_path(given)
