"""Console sign-in: the API's tokens, a signed session cookie, CSRF tokens on every form.

* With tokens configured (`RADCOHORT_API_TOKENS`) a page needs either the API's `Authorization: Bearer`
  header (scripts, tests; checked by app.api.gate.Gate before the request gets here) or the session
  cookie set by the `/login` form. The cookie holds no token: only an HMAC fingerprint of the token it
  was made from, an expiry and a nonce, signed with a key derived from the pseudonym key. Removing a
  token from the configuration ends its sessions; sign-out deletes the cookie.
* With no tokens configured the console is open, like the API.
* CSRF: a form carries `csrf_token` = HMAC(key, the browser's CSRF nonce cookie + the session nonce);
  a POST from a browser (cookie or open mode) without the right one is refused 403. A bearer request
  is exempt (browsers never attach that header on their own).

Cookies: HttpOnly, SameSite=Strict, Path=/, Secure when the request came over https.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from app.config import Settings
from app.tokens import DEFAULT_SCOPES, ApiToken, authenticate

SESSION_COOKIE = "radcohort_session"
CSRF_COOKIE = "radcohort_csrf"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page, and how they got in."""

    actor: str
    scopes: frozenset[str]
    via: str  # "bearer" | "session" | "open"
    session_nonce: str = ""

    @property
    def can_sign_out(self) -> bool:
        return self.via == "session"


class NotSignedIn(Exception):
    """Raised by `viewer()`: the console answers with a redirect to /login (HTML) or 401."""


class CsrfRefused(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _key(settings: Settings) -> bytes:
    return hmac.new(settings.get_pseudonym_key(), b"radcohort-console-session-v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _fingerprint(key: bytes, token: ApiToken) -> str:
    return hmac.new(key, b"token:" + token.secret, hashlib.sha256).hexdigest()[:32]


def make_session(settings: Settings, token: ApiToken) -> str:
    """The cookie value for a signed-in token."""
    key = _key(settings)
    payload = {"f": _fingerprint(key, token), "e": int(time.time()) + SESSION_SECONDS, "n": secrets.token_urlsafe(12)}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    sig = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def read_session(settings: Settings, value: str | None) -> tuple[ApiToken, str] | None:
    """(the configured token, the session nonce) of a valid, unexpired cookie; None otherwise."""
    if not value or "." not in value or len(value) > 1024:
        return None
    key = _key(settings)
    body, _, sig = value.partition(".")
    want = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig.encode(), want.encode()):
        return None
    try:
        payload = json.loads(_unb64(body))
        fingerprint, expires, nonce = str(payload["f"]), int(payload["e"]), str(payload["n"])
    except (ValueError, KeyError, TypeError):
        return None
    if expires < time.time():
        return None
    found = None
    for t in settings.api_token_entries:  # no early exit, like app.tokens.authenticate
        if hmac.compare_digest(_fingerprint(key, t).encode(), fingerprint.encode()):
            found = found or t
    return (found, nonce) if found else None


def check_login(settings: Settings, given: str) -> ApiToken | None:
    """The configured token typed into the sign-in form, or None."""
    return authenticate(settings.api_token_entries, given.strip().encode("utf-8", "replace"))


def tokens_configured(settings: Settings) -> bool:
    return bool(settings.api_token_entries)


def viewer(request: Request, settings: Settings) -> Viewer:
    """The signed-in viewer of this request; NotSignedIn when there is none."""
    if not tokens_configured(settings):
        return Viewer("anonymous", DEFAULT_SCOPES, "open")
    actor = getattr(request.state, "actor", None)
    if actor is None:
        raise NotSignedIn()
    scopes = frozenset(getattr(request.state, "scopes", ()) or ())
    nonce = getattr(request.state, "console_session", None)
    if nonce is not None:  # the gate read the session cookie (ConsoleGate.admit)
        return Viewer(actor, scopes, "session", nonce)
    return Viewer(actor, scopes, "bearer")  # a valid bearer token, checked by the gate


def csrf_nonce(request: Request) -> tuple[str, bool]:
    """(the browser's CSRF nonce, whether it is new and must be set as a cookie)."""
    have = request.cookies.get(CSRF_COOKIE) or ""
    if 16 <= len(have) <= 64 and have.replace("-", "").replace("_", "").isalnum():
        return have, False
    return secrets.token_urlsafe(24), True


def csrf_token(settings: Settings, nonce: str, session_nonce: str) -> str:
    msg = f"csrf|{nonce}|{session_nonce}".encode()
    return hmac.new(_key(settings), msg, hashlib.sha256).hexdigest()


def check_csrf(request: Request, settings: Settings, who: Viewer | None, given: str | None) -> None:
    """Refuse a browser POST whose form lacks the token of this browser (and session)."""
    if who is not None and who.via == "bearer":
        return
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce:
        raise CsrfRefused("the form's security token is missing (cookies blocked, or the page is stale): "
                          "reload the page and submit the form again")
    want = csrf_token(settings, nonce, who.session_nonce if who else "")
    if not given or not hmac.compare_digest(given.encode(), want.encode()):
        raise CsrfRefused("the form's security token does not match this browser's session "
                          "(the page is stale, or the form came from another site): reload the page and "
                          "submit the form again")


def set_cookie(response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
