"""Cohort exports: de-identified DICOM, PNG/NumPy class folders, WebDataset shards (app.exports)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from app import audit
from app.api.deps import ActorDep, CtxDep, SessionDep
from app.db.base import session_scope
from app.errors import RadcohortError
from app.exports import service
from app.jobs.runner import wake_after_commit

router = APIRouter(tags=["exports"])


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["dicom-deid", "dicom", "png", "npy", "webdataset"] = Field(
        description="dicom-deid: de-identified DICOM (PS3.15 Annex E); dicom: the identified originals "
                    "(scope export-identified); png / npy: class folders per split; webdataset: tar shards")
    burned_in: Literal["exclude", "flag"] = Field(
        "exclude", description="instances with BurnedInAnnotation YES (or absent on a modality that often burns "
                               "in text): left out, or included and listed in flagged.csv")
    archive: Literal["zip", "tar"] | None = Field(None, description="default zip (tar for webdataset)")
    image_size: int = Field(224, ge=16, le=4096, description="png/npy/webdataset: square side in pixels")
    bit_depth: Literal[8, 16] = Field(8, description="png: 8 (the worker's images) or 16")


class ExportProgress(BaseModel):
    done: int
    total: int


class ExportOut(BaseModel):
    id: int
    cohort_id: int
    format: str
    params: dict
    status: str
    progress: ExportProgress
    exported: int
    excluded: dict
    flagged: dict
    error: str | None
    download: str | None
    created_at: datetime | None
    finished_at: datetime | None


def _scopes(request: Request) -> frozenset[str]:
    return frozenset(getattr(request.state, "scopes", None) or ())


def _refuse(ctx, actor: str, target: str, fmt: str, missing: str) -> None:
    # recorded in its own unit of work: the request's is rolled back with the 403
    with session_scope(ctx.sessions) as s:
        audit.record(s, actor, "export.refused", target=target, format=fmt, missing_scope=missing)
    extra = " (format 'dicom' is identified output)" if missing == "export-identified" else ""
    raise RadcohortError(f"this token lacks the scope {missing!r}{extra}", status_code=403)


@router.post("/cohorts/{cohort_id}/exports", status_code=202, response_model=ExportOut,
             responses={403: {"description": "token lacks export (or export-identified for format dicom)"},
                        404: {"description": "unknown cohort"}, 422: {"description": "invalid request"}})
def create_export(cohort_id: int, body: ExportIn, request: Request, session: SessionDep, ctx: CtxDep,
                  actor: ActorDep):
    """Start an export of a frozen cohort as a durable background job (GET /api/v1/jobs lists it); poll
    `GET /api/v1/exports/{id}`. Every export is audited (token, cohort, format, de-identification profile)."""
    missing = service.missing_scope(body.format, _scopes(request))
    if missing:
        _refuse(ctx, actor, f"cohort:{cohort_id}", body.format, missing)
    exp = service.create_export(session, cohort_id, body.model_dump(exclude_none=True), actor=actor)
    out = service.view(exp)
    service.queue_export(session, exp.id, actor)  # a durable job (app.jobs), committed with the row
    wake_after_commit(ctx, session)
    return out


class ExportList(BaseModel):
    total: int
    items: list[ExportOut]


@router.get("/exports", response_model=ExportList)
def list_exports(request: Request, session: SessionDep, limit: int = Query(100, ge=1, le=1000),
                 offset: int = Query(0, ge=0),
                 cohort_id: int | None = Query(None, ge=1, le=2**31 - 1, description="only this cohort's exports")):
    """Newest first (identified exports only for tokens with export-identified)."""
    total, items = service.list_exports(session, limit, offset, cohort_id=cohort_id,
                                        identified="export-identified" in _scopes(request))
    return ExportList(total=total, items=items)


@router.get("/exports/{export_id}", response_model=ExportOut, responses={404: {"description": "unknown export"}})
def get_export(export_id: int, request: Request, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Status and progress (done/total instances), the exported/excluded/flagged counts and, when done,
    the download link."""
    exp = service.get_export(session, export_id)
    missing = service.missing_scope(exp.format, _scopes(request))
    if missing:
        _refuse(ctx, actor, f"export:{export_id}", exp.format, missing)
    return service.view(exp)


@router.get("/exports/{export_id}/download", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}, "application/x-tar": {}}},
                       403: {"description": "token lacks the scope for this export"},
                       404: {"description": "unknown export"}, 409: {"description": "not finished yet"}})
def download(export_id: int, request: Request, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """The archive: the files, manifest.csv, dataset_card.json and README.md (and flagged.csv if any)."""
    exp = service.get_export(session, export_id)
    missing = service.missing_scope(exp.format, _scopes(request))
    if missing:
        _refuse(ctx, actor, f"export:{export_id}", exp.format, missing)
    path, media = service.archive_for_download(session, ctx.settings.data_dir, exp, actor=actor)
    return FileResponse(path, media_type=media, filename=path.name)


@router.delete("/exports/{export_id}", status_code=204,
               responses={403: {"description": "token lacks the scope for this export"},
                          404: {"description": "unknown export"}, 409: {"description": "queued or running: cancel it first"}})
def delete_export(export_id: int, request: Request, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Remove a finished (or failed, cancelled) export's files from the server: shared data should not linger.
    The row stays, with status `deleted`, and so does its audit trail; the deletion is audited."""
    exp = service.get_export(session, export_id)
    missing = service.missing_scope(exp.format, _scopes(request))
    if missing:
        _refuse(ctx, actor, f"export:{export_id}", exp.format, missing)
    service.delete_archive(session, ctx.settings.data_dir, export_id, actor)
    return Response(status_code=204)

