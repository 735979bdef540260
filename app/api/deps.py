"""Request dependencies: context, settings, a session committed once per request, auth."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.config import Settings
from app.context import AppContext
from app.db.base import session_scope

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
    """When RADCOHORT_API_TOKENS is set, every /api/v1 call needs one of them."""
    tokens = request.app.state.ctx.settings.tokens
    if not tokens:
        request.state.actor = "anonymous"
        return
    given = creds.credentials if creds and creds.scheme.lower() == "bearer" else None
    if not given or not any(hmac.compare_digest(given, t) for t in tokens):
        raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    # an actor name for the audit log that never reveals the token
    request.state.actor = "token:" + hashlib.sha256(given.encode()).hexdigest()[:12]


def get_actor(request: Request) -> str:
    return getattr(request.state, "actor", "anonymous")


CtxDep = Annotated[AppContext, Depends(get_ctx)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": commit before the response is sent, so a client never reads ahead of its own write
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ActorDep = Annotated[str, Depends(get_actor)]
