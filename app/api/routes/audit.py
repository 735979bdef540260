"""Audit log listing."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from app import audit
from app.api.deps import SessionDep
from app.db.models import AuditEvent

router = APIRouter(tags=["audit"])


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict


class AuditList(BaseModel):
    total: int
    items: list[AuditOut]


@router.get("/audit", response_model=AuditList)
def list_audit(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first: who registered nodes, retrieved, built cohorts, started or cancelled training."""
    total = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
    return AuditList(total=total, items=[AuditOut.model_validate(e, from_attributes=True)
                                         for e in audit.listing(session, limit, offset)])
