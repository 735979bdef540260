"""Worklists: batch study requests from an uploaded CSV/XLSX (app.worklists): upload, resolve by C-FIND
(a dry run, per-row outcome), retrieve the found studies as one job, per-row results as CSV."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from app import audit
from app.api.deps import ActorDep, CtxDep, SessionDep, has_scope, require_scope
from app.db.base import session_scope
from app.errors import RadcohortError
from app.jobs.runner import wake_after_commit
from app.worklists import service
from app.worklists.parse import MAX_BYTES, parse

router = APIRouter(prefix="/worklists", tags=["worklists"])
IDENTIFIED = "find-identified"


class UploadOut(BaseModel):
    id: int
    rows: int
    key_type: str
    invalid: int
    warnings: list[dict]


class RowOut(BaseModel):
    row: int
    key_type: str
    key: str | None = Field(description="null for PatientID/AccessionNumber unless the token has find-identified")
    filters: dict
    status: str = Field(description="pending | found | not_found | ambiguous | invalid | refused")
    studies: list[str]
    detail: str | None


class WorklistOut(BaseModel):
    id: int
    filename: str | None
    key_type: str
    status: str = Field(description="uploaded | resolving | resolved | failed")
    node: str | None
    total: int
    counts: dict[str, int]
    warnings: list[dict]
    retrieval_id: int | None
    error: str | None
    created_at: datetime | None
    rows: list[RowOut]


class ResolveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str = Field(min_length=1, max_length=64, description="the PACS node to C-FIND on")


class RetrieveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_ambiguous: bool = Field(False, description="also retrieve every study of rows that matched several")


class RetrieveOut(BaseModel):
    retrieval_id: int
    studies: int


def _check_identified(request: Request, ctx, actor: str, key_type: str, what: str, target: str) -> None:
    """PatientID / AccessionNumber worklists are identified searches: find-identified, refusals audited."""
    if service.needs_identified(key_type) and not has_scope(request, IDENTIFIED):
        with session_scope(ctx.sessions) as s:
            audit.record(s, actor, "worklist.refused", target=target, key_type=key_type, step=what,
                         missing_scope=IDENTIFIED)
        raise RadcohortError(f"a {key_type} worklist is an identified search: this token lacks the scope "
                             f"{IDENTIFIED!r} (StudyInstanceUID worklists do not need it)", status_code=403)


@router.post("", status_code=201, response_model=UploadOut,
             dependencies=[Depends(require_scope("retrieve"))],
             responses={403: {"description": "PatientID/AccessionNumber worklist without find-identified"},
                        413: {"description": "file too large or too many rows"},
                        415: {"description": "not CSV or XLSX"},
                        422: {"description": "no key column, several without `column`, empty file"}})
def upload(request: Request, ctx: CtxDep, session: SessionDep, actor: ActorDep,
           file: UploadFile = File(..., description="CSV (, ; or tab) or XLSX; one row per request"),
           column: str | None = Form(None, description="the key column when several are present: "
                                                       "StudyInstanceUID, AccessionNumber or PatientID")):
    """Upload a worklist: a header row naming a key column (StudyInstanceUID, AccessionNumber or PatientID) and
    optional StudyDate (YYYYMMDD, YYYY-MM-DD or a range), Modality and StudyDescription columns. Bad rows are
    kept as `invalid` with the reason (see GET); unknown columns are ignored and listed in `warnings`."""
    parsed = parse(file.file.read(MAX_BYTES + 1), file.filename, column)
    _check_identified(request, ctx, actor, parsed.key_type, "upload", "worklist:new")
    return service.store(session, parsed, file.filename, actor)


class WorklistSummary(BaseModel):
    id: int
    filename: str | None
    key_type: str
    status: str
    node: str | None
    total: int
    counts: dict[str, int]
    retrieval_id: int | None
    created_at: datetime | None


class WorklistList(BaseModel):
    total: int
    items: list[WorklistSummary]


@router.get("", response_model=WorklistList)
def list_worklists(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first, without their rows."""
    total, items = service.list_worklists(session, limit, offset)
    return WorklistList(total=total, items=items)


@router.get("/{worklist_id}", response_model=WorklistOut, responses={404: {"description": "unknown worklist"}})
def get_worklist(worklist_id: int, request: Request, session: SessionDep,
                 limit: int | None = Query(None, ge=1, le=100_000), offset: int = Query(0, ge=0)):
    """The worklist and its rows (`row` = line in the uploaded file, header = 1)."""
    wl = service.get_worklist(session, worklist_id)
    return service.view(session, wl, show_keys=has_scope(request, IDENTIFIED), limit=limit, offset=offset)


@router.post("/{worklist_id}/resolve", status_code=202, response_model=WorklistOut,
             dependencies=[Depends(require_scope("retrieve"))],
             responses={403: {"description": "identified worklist without find-identified"},
                        404: {"description": "unknown worklist or node"}, 409: {"description": "already resolving"}})
def resolve(worklist_id: int, body: ResolveIn, request: Request, ctx: CtxDep, session: SessionDep, actor: ActorDep):
    """Dry run: C-FIND every valid row on `node` (nothing is moved); poll GET until status is resolved."""
    wl = service.get_worklist(session, worklist_id)
    _check_identified(request, ctx, actor, wl.key_type, "resolve", f"worklist:{worklist_id}")
    service.start_resolve(session, wl, body.node, actor)  # a durable job (app.jobs), committed with the status
    wake_after_commit(ctx, session)
    return service.view(session, wl, show_keys=has_scope(request, IDENTIFIED), limit=0)


@router.post("/{worklist_id}/retrieve", status_code=202, response_model=RetrieveOut,
             dependencies=[Depends(require_scope("retrieve"))],
             responses={404: {"description": "unknown worklist"}, 409: {"description": "not resolved yet"},
                        422: {"description": "no row found a study"}})
def retrieve(worklist_id: int, ctx: CtxDep, session: SessionDep, actor: ActorDep, body: RetrieveIn | None = None):
    """Retrieve the studies of the found rows (and ambiguous ones with include_ambiguous) as one retrieval;
    follow it at GET /api/v1/retrievals/{retrieval_id}."""
    from app.retrievals.service import queue_retrieval

    wl = service.get_worklist(session, worklist_id)
    r = service.create_retrieval(session, wl, actor, include_ambiguous=bool(body and body.include_ambiguous))
    rid = r.id
    queue_retrieval(session, rid, actor)
    wake_after_commit(ctx, session)
    return RetrieveOut(retrieval_id=rid, studies=len(r.query["StudyInstanceUID"].split("\\")))


@router.get("/{worklist_id}/results.csv", response_class=Response,
            responses={200: {"content": {"text/csv": {}}}, 404: {"description": "unknown worklist"}})
def results(worklist_id: int, request: Request, session: SessionDep):
    """Per-row outcome as CSV (row, key_type, key, status, studies, detail, and the retrieval's counts)."""
    wl = service.get_worklist(session, worklist_id)
    body = service.results_csv(session, wl, show_keys=has_scope(request, IDENTIFIED))
    return Response(content=body, media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="worklist-{worklist_id}.csv"'})
