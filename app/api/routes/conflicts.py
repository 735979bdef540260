"""Store conflicts: received copies that contradict the index, kept aside (UIDs and pseudonyms only)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from app.api.deps import SessionDep, require_scope
from app.db.models import StoreConflict
from app.errors import NotFound

router = APIRouter(tags=["conflicts"], dependencies=[Depends(require_scope("read"))])


class ConflictOut(BaseModel):
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    reason: str = Field(description="sop_content: a known SOP Instance UID with other content; sop_study / "
                        "sop_series: a known SOP Instance UID under another study or series; study_patient: "
                        "a new instance of a known study naming another patient")
    received_sha256: str
    file_path: str = Field(description="where the copy is kept, relative to the store (never indexed)")
    file_size: int
    source_node: str | None
    calling_ae: str | None
    patient_key: str | None = Field(description="HMAC pseudonym of the received copy's patient")
    existing_study_instance_uid: str | None
    existing_series_instance_uid: str | None
    existing_sha256: str | None
    existing_patient_key: str | None = Field(description="HMAC pseudonym of the indexed patient")
    existing_source_node: str | None
    received_at: datetime


class ConflictPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[ConflictOut]


@router.get("/conflicts", response_model=ConflictPage)
def list_conflicts(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0),
                   sop_instance_uid: str | None = Query(None, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$"),
                   reason: str | None = Query(None, max_length=32)):
    q = select(StoreConflict)
    if sop_instance_uid:
        q = q.where(StoreConflict.sop_instance_uid == sop_instance_uid)
    if reason:
        q = q.where(StoreConflict.reason == reason)
    total = session.scalar(select(func.count()).select_from(q.subquery()))
    rows = session.scalars(q.order_by(StoreConflict.id.desc()).limit(limit).offset(offset))
    return ConflictPage(total=total or 0, limit=limit, offset=offset,
                        items=[ConflictOut.model_validate(r, from_attributes=True) for r in rows])


@router.get("/conflicts/{conflict_id}", response_model=ConflictOut)
def get_conflict(session: SessionDep, conflict_id: int = Path(ge=1, le=2**31 - 1)):
    row = session.get(StoreConflict, conflict_id)
    if row is None:
        raise NotFound(f"conflict {conflict_id} not found")
    return ConflictOut.model_validate(row, from_attributes=True)
