"""Audit log listing."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel

from app import audit
from app.api.deps import SessionDep

router = APIRouter(tags=["audit"])


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict


@router.get("/audit", response_model=list[AuditOut])
def list_audit(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    return [AuditOut.model_validate(e, from_attributes=True) for e in audit.listing(session, limit, offset)]
