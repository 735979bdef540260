"""Audit log: who built which cohort, retrieved what, started which training job."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import AuditEvent


def record(session: Session, actor: str, action: str, target: str | None = None, **details) -> None:
    """Add one audit event (flushed with the caller's unit of work). Never pass patient identifiers."""
    session.add(AuditEvent(actor=actor, action=action, target=target, details=details))


def listing(session: Session, limit: int = 100, offset: int = 0) -> list[AuditEvent]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(q))
