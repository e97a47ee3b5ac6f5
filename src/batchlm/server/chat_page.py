"""The built-in web chat page: static files shipped in the package (server/ui/), served at / and /ui/.

The page is plain HTML, CSS and JavaScript modules with no build step and nothing fetched from
elsewhere, so it works offline. Its files are public like /health: the API calls it makes carry the
key the user typed in, and the API-key middleware checks those as it checks any client's.
"""

from __future__ import annotations

import os
from importlib import resources

from fastapi import FastAPI
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

UI_PACKAGE = ("batchlm.server", "ui")
# Only the page's own files may load, and the page may talk only to this server: markup that ever got
# past the Markdown renderer's escaping still could not run a script or reach another host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class RevalidatedFiles(StaticFiles):
    """Static files the browser must revalidate (a cheap 304 by ETag), so an upgraded package's
    scripts are never mixed with a cached older page."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def install_chat_page(app: FastAPI) -> None:
    """GET / answers the page; /ui/ serves its scripts and style sheet."""
    package, folder = UI_PACKAGE
    page = resources.files(package).joinpath(folder).joinpath("index.html").read_text(encoding="utf-8")

    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    app.add_api_route("/", chat_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui", RevalidatedFiles(packages=[UI_PACKAGE]), name="ui")
