"""Pages served from files shipped in packages, with nothing fetched from elsewhere, so they work
offline: the built-in web chat page (server/ui/, at / and /ui/: plain HTML, CSS and JavaScript modules
with no build step) and the API docs, /docs (Swagger UI) and /redoc, whose scripts, styles and icon are
package data of the fastapi-offline dependency. The pages are public like /health: the API calls the
chat page makes carry the key the user typed in, which the API-key middleware checks as any client's."""

from __future__ import annotations

import os
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from batchlm.server.root_path import PREFIX

UI_PACKAGE = ("batchlm.server", "ui")
# Only the page's own files may load, and the page may talk only to this server: markup that ever got
# past the Markdown renderer's escaping still could not run a script or reach another host.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
# The page names its files under the prefix a proxy announces: a cache must keep one copy per prefix.
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Vary": "X-Forwarded-Prefix",
    **FILE_HEADERS,
}


def public_prefix(request: Request) -> str:
    """The path a reverse proxy serves this server under, without a trailing slash ("" when served at the
    root): ASGI's root_path (--root-path), else the X-Forwarded-Prefix header that Traefik's
    StripPrefix sends (nginx: `proxy_set_header X-Forwarded-Prefix /llm;`). The pages name their files
    and the API under it; a malformed prefix is ignored (the page then uses relative URLs, right
    wherever its URL ends in a slash)."""
    given = request.scope.get("root_path") or request.headers.get("x-forwarded-prefix", "")
    return given.rstrip("/") if PREFIX.fullmatch(given) else ""


class RevalidatedFiles(StaticFiles):
    """Static files the browser must revalidate (a cheap 304 by ETag), so an upgraded package's
    scripts are never mixed with a cached older page."""

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(FILE_HEADERS)
        return response


def install_chat_page(app: FastAPI) -> None:
    """GET / answers the page; /ui/ serves its scripts and style sheet."""
    package, folder = UI_PACKAGE
    page = resources.files(package).joinpath(folder).joinpath("index.html").read_text(encoding="utf-8")

    async def chat_page(request: Request) -> HTMLResponse:
        # Its files are named relative to the page, which a proxy's /llm/ serves; at /llm (no slash)
        # they would resolve beside it, so a known prefix names them in full.
        prefix = public_prefix(request)
        return HTMLResponse(
            page.replace('="ui/', f'="{prefix}/ui/') if prefix else page, headers=PAGE_HEADERS
        )

    app.add_api_route("/", chat_page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui", RevalidatedFiles(packages=[UI_PACKAGE]), name="ui")


ASSETS_URL = "/docs-assets"
SWAGGER_UI_URL = "/docs"
REDOC_URL = "/redoc"


def install_docs_pages(app: FastAPI) -> None:
    """Serve the two pages and their assets; `app` must be built with docs_url=None, redoc_url=None."""
    app.mount(
        ASSETS_URL,
        StaticFiles(directory=str(resources.files("fastapi_offline") / "static")),
        name="docs-assets",
    )
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(SWAGGER_UI_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = public_prefix(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{redirect_url}" if redirect_url else None,
        )

    if redirect_url:

        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = public_prefix(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
