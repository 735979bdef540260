"""Durable background jobs (app.jobs): list, get, cancel. Probes, cohort pulls, exports, worklist resolves and
retrievals are jobs; their own routes stay the way to follow them, these show every one in one place."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from app.api.deps import ActorDep, CtxDep, SessionDep, has_scope
from app.jobs import queue as jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# the scope a cancel needs, per kind (exports are the export scope's; the rest act on a PACS)
CANCEL_SCOPE = {"export": "export"}


class JobOut(BaseModel):
    id: int
    kind: str = Field(description="probe | cohort_pull | export | worklist_resolve | retrieval")
    queue: str = Field(description="the queue a runner serves: probe, cohort, export, worklist, retrieval")
    target: str | None = Field(None, description="the row it works on, e.g. export:7, retrieval:12")
    status: Status
    payload: dict = Field(description="ids and options only (never a patient identifier)")
    progress: dict
    result: dict | None = None
    error: str | None = None
    cancel_requested: bool
    attempts: int = Field(description="claims so far (more than 1: taken over from a stopped runner)")
    runner: str | None = Field(None, description="host:pid:id of the runner holding it")
    heartbeat_at: datetime | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    note: str | None = Field(None, description="why a queued job is not moving, when known")


class JobList(BaseModel):
    total: int
    items: list[JobOut]


def _served(session, ctx) -> set[str] | None:
    """The queues some live process serves (None: this API runs every job queue itself)."""
    if ctx.settings.api_runs_jobs:
        return None
    from app.training.workers import alive

    return {q for w in alive(session) for q in ((w.capabilities or {}).get("queues") or [])}


def _out(job, served: set[str] | None) -> JobOut:
    note = None
    if job.status == "queued" and served is not None and job.queue not in served:
        note = f"queued — no worker serves the {job.queue} queue: start `radcohort worker --queues {job.queue}`"
    return JobOut(**jobs.view(job), note=note)


@router.get("", response_model=JobList)
def list_jobs(session: SessionDep, ctx: CtxDep, kind: str | None = Query(None, max_length=32),
              queue: str | None = Query(None, max_length=32), status: Status | None = None,
              limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first; filter by kind, queue and status."""
    total, rows = jobs.list_jobs(session, kind=kind, queue=queue, status=status, limit=limit, offset=offset)
    served = _served(session, ctx)
    return JobList(total=total, items=[_out(j, served) for j in rows])


@router.get("/{job_id}", response_model=JobOut, responses={404: {"description": "unknown job"}})
def get_job(job_id: int, session: SessionDep, ctx: CtxDep):
    return _out(jobs.get_job(session, job_id), _served(session, ctx))


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses={403: {"description": "token lacks the kind's scope"}, 404: {"description": "unknown job"},
                        409: {"description": "already finished"}})
def cancel_job(job_id: int, request: Request, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Queued: cancelled at once. Running: `cancel_requested`, and it stops at its next checkpoint (a retrieval
    at its next study/series boundary, an export between images, a pull between retrievals, a resolve between
    rows; a probe runs to its end)."""
    job = jobs.get_job(session, job_id)
    scope = CANCEL_SCOPE.get(job.kind, "retrieve")
    if not has_scope(request, scope):
        raise HTTPException(status_code=403, detail=f"this token lacks the scope {scope!r}")
    return _out(jobs.cancel_job(session, job_id, actor), _served(session, ctx))
