"""The console's pages. Thin like the API's routes: parse the form or query -> the same services (often the
API's own route functions, called with the signed-in actor) -> a Jinja2 template. Nothing here talks to a
PACS, the database or the worker any other way than the API does."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import FormData

from app.config import Settings
from app.errors import RadcohortError
from app.web import auth
from app.web.render import STATIC, STATIC_URL, error_page, flash_redirect, render
from app.web.throttle import LoginThrottle


def _who(request: Request) -> auth.Viewer:
    return auth.viewer(request, request.app.state.ctx.settings)


Who = Annotated[auth.Viewer, Depends(_who)]


async def _checked_form(request: Request) -> FormData:
    """The POSTed form, after its CSRF token was checked (403 otherwise)."""
    settings = request.app.state.ctx.settings
    try:
        who = auth.viewer(request, settings)
    except auth.NotSignedIn:
        who = None
    form = await request.form()
    given = form.get("csrf_token")
    auth.check_csrf(request, settings, who, given if isinstance(given, str) else None)
    if who is None and request.url.path != "/login":
        raise auth.NotSignedIn()
    return form


Form = Annotated[FormData, Depends(_checked_form)]


def _text(form: FormData, name: str) -> str | None:
    v = form.get(name)
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return None


def _errors(exc: Exception) -> list[str]:
    if isinstance(exc, ValidationError):
        return [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()]
    if isinstance(exc, RadcohortError):
        return [exc.message]
    detail = getattr(exc, "detail", None)
    if isinstance(detail, list):
        return [f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg')}" for e in detail]
    return [str(detail or exc)]


def _status(exc: Exception) -> int:
    if isinstance(exc, RadcohortError):
        return exc.status_code
    return getattr(exc, "status_code", 422)


def _safe_next(url: str | None) -> str:
    if url and url.startswith("/") and not url.startswith("//") and "\\" not in url:
        return url
    return "/"


def mount(app: FastAPI, settings: Settings) -> None:
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="console-static")
    throttle = LoginThrottle(settings.login_max_failures, settings.login_window_s)

    @app.exception_handler(auth.NotSignedIn)
    async def _not_signed_in(request: Request, _exc: auth.NotSignedIn):
        if request.headers.get("x-console-poll"):
            return Response("sign in again", status_code=401)
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login" + ("" if nxt == "/" else f"?next={quote(nxt, safe='')}"), status_code=303)

    @app.exception_handler(auth.CsrfRefused)
    async def _csrf_refused(request: Request, exc: auth.CsrfRefused):
        return error_page(request, 403, exc.message)

    # ------------------------------------------------------------------ sign-in
    @app.get("/login", include_in_schema=False)
    def login_page(request: Request, next: str | None = None):
        who = None
        if not auth.tokens_configured(settings):
            who = auth.Viewer("anonymous", frozenset(), "open")
        else:
            try:
                who = auth.viewer(request, settings)
            except auth.NotSignedIn:
                pass
        return render(request, "login.html", who=who, next=_safe_next(next), open=not auth.tokens_configured(settings))

    @app.post("/login", include_in_schema=False)
    def login(request: Request, form: Form):
        nxt = _safe_next(_text(form, "next"))
        if not auth.tokens_configured(settings):
            return RedirectResponse(nxt, status_code=303)
        address = request.client.host if request.client else "unknown"
        wait = throttle.retry_after(address)
        if wait is not None:  # checked before the token: a right guess must not show through the refusal
            response = render(request, "login.html", status=429, who=None, next=nxt, open=False,
                              error=f"Too many failed sign-ins from your address: try again in {wait} s.")
            response.headers["Retry-After"] = str(wait)
            return response
        token = auth.check_login(settings, _text(form, "token") or "")
        if token is None:
            throttle.failed(address)
            return render(request, "login.html", status=401, who=None, next=nxt, open=False,
                          error="Unknown token: use one of the API tokens.")
        response = flash_redirect(request, nxt, f"Signed in as {token.actor}.")
        auth.set_cookie(response, request, auth.SESSION_COOKIE, auth.make_session(settings, token),
                        max_age=auth.SESSION_SECONDS)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, form: Form):
        response = flash_redirect(request, "/login", "Signed out.")
        response.delete_cookie(auth.SESSION_COOKIE, path="/")
        return response

    from app.web import pages

    pages.register(app, settings)
