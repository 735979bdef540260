"""The API's front door, a pure ASGI middleware: authentication, then per-route body limits.

It runs before FastAPI reads, parses or validates anything: a request without a valid bearer token is
answered 401 from its headers alone (its body is never read, so it costs no memory and teaches no
schema), and a body over its route's limit is answered 413 from its Content-Length or as soon as the
bytes that arrived pass the limit.
"""

from __future__ import annotations

import json
import re

from app.config import Settings
from app.tokens import DEFAULT_SCOPES, ApiToken, authenticate, parse_tokens

# open without a token: the liveness probe only (the schema and docs need a token too)
OPEN_PATHS = frozenset({"/health"})
_BEARER = re.compile(rb"^[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+) *$")


async def _answer(send, status: int, detail, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The raw token of `Authorization: Bearer <token>` (any bytes: latin-1 headers included)."""
    for k, v in headers:
        if k.lower() == b"authorization":
            m = _BEARER.match(v)
            return m.group(1) if m else None
    return None


class Gate:
    """401 before anything else, then 413 over the route's body limit (JSON routes small, uploads large)."""

    def __init__(self, app, settings: Settings, console=None):
        self.app, self.settings = app, settings
        # the web console (app.web): its pages also sign in with a session cookie, which the console
        # verifies here (app.web.ConsoleGate: admit(scope, headers), is_upload_path(path))
        self.console = console
        self._parsed: tuple[str | None, list[ApiToken]] = (None, [])
        self._uploads: list[re.Pattern] | None = None

    def _tokens(self) -> list[ApiToken]:
        raw = self.settings.api_tokens  # read per request: a test may set it after the app is built
        if raw != self._parsed[0]:
            self._parsed = (raw, parse_tokens(raw))
        return self._parsed[1]

    def _upload_paths(self, app) -> list[re.Pattern]:
        """Path patterns of the operations that take a multipart upload, read once from the app's
        OpenAPI schema (public, whatever the router internals of this FastAPI version)."""
        if self._uploads is None:
            found = []
            for template, ops in (app.openapi().get("paths", {}) if app is not None else {}).items():
                for op in ops.values():
                    if isinstance(op, dict) and "multipart/form-data" in (op.get("requestBody", {}).get("content") or {}):
                        rx = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
                        found.append(re.compile(f"^{rx}$"))
            self._uploads = found
        return self._uploads

    def limit_for(self, scope) -> int:
        path = scope.get("path", "")
        if any(p.match(path) for p in self._upload_paths(scope.get("app"))) or (
                self.console is not None and self.console.is_upload_path(path)):
            # the multipart envelope around the largest accepted file
            return self.settings.predict_max_upload_mb * 2**20 + 2**20
        return self.settings.api_max_body_kb * 1024

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        tokens = self._tokens()
        state = scope.setdefault("state", {})
        if not tokens:
            state["actor"], state["scopes"] = "anonymous", DEFAULT_SCOPES
        elif scope.get("path") not in OPEN_PATHS:
            given = bearer(headers)
            token = authenticate(tokens, given)
            if token is None and given is None and scope["type"] == "http" and self.console is not None \
                    and self.console.admit(scope, headers):
                # a console page without a bearer header: signed in with the console's session cookie
                # (state set by admit), or a page that answers with the sign-in form
                return await self._limited(scope, receive, send, headers)
            if token is None:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                return await _answer(send, 401, "missing or invalid bearer token",
                                     [(b"www-authenticate", b"Bearer")])
            state["actor"], state["scopes"] = token.actor, token.scopes
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self._limited(scope, receive, send, headers)

    async def _limited(self, scope, receive, send, headers):
        limit = self.limit_for(scope)
        detail = f"request body larger than the limit of {limit} bytes"
        declared = next((v for k, v in headers if k.lower() == b"content-length"), b"")
        if declared.strip().isdigit() and int(declared) > limit:
            return await _answer(send, 413, detail)
        seen = 0
        answered = False
        started = False

        async def counted():
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # answer here, then tell the app the client left: it stops reading and its own
                    # response (to a "disconnected" client) is dropped below
                    answered = True
                    if not started:
                        await _answer(send, 413, detail)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted, guarded_send)
