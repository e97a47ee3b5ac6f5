"""/docs and /redoc load every script, style and icon from this server (they render offline)."""

from __future__ import annotations

import re

import httpx
import pytest

from batchlm.server.background import BackgroundServer
from fake_engine import FakeEngine

# Every src= / href= of the page, and the url given to SwaggerUIBundle / Redoc.
REFERENCE = re.compile(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""")


@pytest.fixture(scope="module")
def server() -> BackgroundServer:
    with BackgroundServer(FakeEngine()) as running:
        yield running


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_references_only_this_server(server: BackgroundServer, page: str) -> None:
    response = httpx.get(server.base_url + page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    references = REFERENCE.findall(response.text)
    assert references, response.text
    assert all(url.startswith("/") and not url.startswith("//") for url in references), references
    for url in references:
        asset = httpx.get(server.base_url + url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "/openapi.json" in references


def test_the_swagger_ui_script_is_the_real_bundle(server: BackgroundServer) -> None:
    script = httpx.get(server.base_url + "/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and b"SwaggerUIBundle" in script.content
