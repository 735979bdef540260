"""The web console: server-rendered pages over the API's services (issue #14; docs/console.md).

Mounted at `/` by app.api.main.create_app next to the API (`/api/v1`, unchanged). Templates and
static assets live in this package and are served by the app itself: no CDN, no build step.
"""

from __future__ import annotations

import re

from starlette.requests import cookie_parser

from app.config import Settings

# the console's fixed paths (app.web.routes); everything else stays the API's
CONSOLE_PREFIXES = ("/login", "/logout", "/overview", "/nodes", "/retrievals", "/worklists", "/instances", "/cohorts",
                    "/training", "/models", "/static/console")
# the console's multipart uploads: a DICOM file to classify, a worklist
_UPLOAD = re.compile(r"^/models/[^/]+/predict$|^/worklists/upload$")


def is_console_path(path: str) -> bool:
    return path == "/" or any(path == p or path.startswith(p + "/") for p in CONSOLE_PREFIXES)


class ConsoleGate:
    """What app.api.gate.Gate asks about a request without a bearer header."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @staticmethod
    def is_console_path(path: str) -> bool:
        return is_console_path(path)

    @staticmethod
    def is_upload_path(path: str) -> bool:
        return bool(_UPLOAD.match(path))

    def admit(self, scope, headers) -> bool:
        """Let a console request in: signed in by its session cookie (who it is goes into the scope's
        state, as the gate does for a bearer token), or not signed in (the page answers with the sign-in
        form). An upload is only let in signed in: its body is never read otherwise."""
        from app.web.auth import SESSION_COOKIE, read_session

        path = scope.get("path", "")
        if not is_console_path(path):
            return False
        raw = b"; ".join(v for k, v in headers if k.lower() == b"cookie").decode("latin-1")
        found = read_session(self.settings, cookie_parser(raw).get(SESSION_COOKIE)) if raw else None
        if found is not None:
            token, nonce = found
            state = scope.setdefault("state", {})
            state["actor"], state["scopes"], state["console_session"] = token.actor, token.scopes, nonce
            return True
        return not self.is_upload_path(path)


def mount_console(app, settings: Settings) -> None:
    """Add the console's routes and static assets to `app`."""
    from app.web.routes import mount

    mount(app, settings)
