"""Request dependencies: context, settings, a session committed once per request, auth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.context import AppContext
from app.db.base import session_scope
from app.tokens import SCOPES

_bearer = HTTPBearer(auto_error=False)


def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.ctx.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, committed at the boundary; repositories only flush."""
    with session_scope(request.app.state.ctx.sessions) as session:
        yield session


def require_token(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Authentication happens before the request reaches FastAPI (app.api.gate.Gate sets
    `request.state.actor` and `.scopes`); this only refuses a request the gate did not pass, e.g. an
    app mounted without it. `creds` documents the bearer scheme in the OpenAPI schema."""
    if getattr(request.state, "actor", None) is None:
        raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def require_scope(name: str):
    """A dependency: 403 unless the caller's token carries scope `name` (app.tokens.SCOPES)."""
    if name not in SCOPES:
        raise ValueError(f"unknown scope {name!r}")

    def check(request: Request) -> None:
        if not has_scope(request, name):
            raise HTTPException(status_code=403, detail=f"this token lacks the scope {name!r}")

    return check


def has_scope(request: Request, name: str) -> bool:
    return name in (getattr(request.state, "scopes", None) or ())


def get_actor(request: Request) -> str:
    return getattr(request.state, "actor", "anonymous")


CtxDep = Annotated[AppContext, Depends(get_ctx)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": commit before the response is sent, so a client never reads ahead of its own write
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ActorDep = Annotated[str, Depends(get_actor)]
