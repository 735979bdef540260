"""Swagger UI and ReDoc served from packaged assets, never a CDN (hospital networks are often offline).

The assets come from the maintained `fastapi-offline` package (Swagger UI bundle, CSS, ReDoc
standalone); the pages are FastAPI's own HTML pointed at them, ReDoc without Google Fonts.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_URL = "/static/api-docs"


def _assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def mount_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """/docs and /redoc with every script, style and icon served by this app."""
    app.mount(STATIC_URL, StaticFiles(directory=_assets()), name="api-docs-assets")
    title = app.title

    @app.get(docs_url, include_in_schema=False)
    def _swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{title} API",
                                   swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
                                   swagger_favicon_url=f"{STATIC_URL}/favicon.png")

    @app.get(redoc_url, include_in_schema=False)
    def _redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{title} API",
                              redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{STATIC_URL}/favicon.png", with_google_fonts=False)
