"""Jinja2 templates from this package, the page context every template gets, and security headers."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from app import __version__
from app.web import auth

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_URL = "/static/console"
FLASH_COOKIE = "radcohort_flash"

NAV = [("/", "Overview"), ("/nodes", "PACS nodes"), ("/retrievals", "Retrievals"), ("/worklists", "Worklists"),
       ("/instances", "Index"), ("/cohorts", "Cohorts"), ("/training", "Training"), ("/models", "Models")]

# scripts and styles from this app only; images from this app or inline (SVG charts are markup)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'self'; object-src 'none'")


def _pct(v, digits: int = 1) -> str:
    if v is None:
        return "—"
    try:
        return f"{float(v):.{digits}f} %"
    except (TypeError, ValueError):
        return "—"


def _num(v, fmt: str = ".3f") -> str:
    if v is None:
        return "—"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "—" if math.isnan(f) else format(f, fmt)


def _when(v) -> str:
    if not v:
        return "—"
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v)
        except ValueError:
            return v
    if v.tzinfo is None:
        v = v.replace(tzinfo=timezone.utc)
    return v.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds) -> str:
    if seconds is None:
        return "—"
    s = int(float(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _pretty(v) -> str:
    return json.dumps(v, indent=1, sort_keys=True, default=str)


env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "svg"]),
                  trim_blocks=True, lstrip_blocks=True)
env.filters.update(pct=_pct, num=_num, when=_when, duration=_duration, pretty=_pretty,
                   urlq=lambda v: quote(str(v), safe=""))
env.globals.update(NAV=NAV, STATIC_URL=STATIC_URL, VERSION=__version__)


def _secure(response, request: Request) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"


def render(request: Request, template: str, status: int = 200, who: auth.Viewer | None = None, **context):
    """A full page (or a fragment template) with the console's context and headers."""
    settings = request.app.state.ctx.settings
    nonce, new = auth.csrf_nonce(request)
    csrf = auth.csrf_token(settings, nonce, who.session_nonce if who else "")
    raw_flash = request.cookies.get(FLASH_COOKIE)
    flash = unquote(raw_flash) if raw_flash else None
    path = request.url.path
    section = next((href for href, _ in reversed(NAV) if href != "/" and (path == href or path.startswith(href + "/"))),
                   "/" if path == "/" else None)
    html = env.get_template(template).render(request=request, who=who, csrf_token=csrf, flash=flash,
                                             section=section, path=path, **context)
    response = HTMLResponse(html, status_code=status)
    _secure(response, request)
    if new:
        auth.set_cookie(response, request, auth.CSRF_COOKIE, nonce, max_age=None)
    if flash and not template.startswith("_"):
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def error_page(request: Request, status: int, detail):
    """The console's error page (404 unknown id, 403 CSRF, 409 conflicts, 422 bad input ...)."""
    who = None
    try:
        who = auth.viewer(request, request.app.state.ctx.settings)
    except auth.NotSignedIn:
        pass
    if isinstance(detail, list):
        lines = []
        for e in detail:
            if isinstance(e, dict):
                loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
                lines.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
            else:
                lines.append(str(e))
    else:
        lines = [str(detail)]
    titles = {400: "Bad request", 401: "Not signed in", 403: "Refused", 404: "Not found", 409: "Not possible now",
              413: "Too large", 415: "Unsupported file", 422: "Invalid input", 502: "The PACS or a helper failed",
              503: "Unavailable", 504: "Timed out"}
    return render(request, "error.html", status=status, who=who, status_code=status,
                  title=titles.get(status, "Error"), lines=lines)


def flash_redirect(request: Request, url: str, message: str | None = None):
    """303 to `url` (post/redirect/get), with a one-time message shown on the next page."""
    from fastapi.responses import RedirectResponse

    response = RedirectResponse(url, status_code=303)
    if message:
        auth.set_cookie(response, request, FLASH_COOKIE, quote(message[:500]), max_age=60)
    return response
