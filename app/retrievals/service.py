"""Retrieval records, and their durable jobs (kind "retrieval", app.jobs) that run them in the background."""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import audit
from app.context import AppContext
from app.db.models import Retrieval
from app.dicom.queries import validate_query
from app.errors import Conflict, InvalidInput, NotFound
from app.retrievals.nodes import get_node
from app.retrievals.schemas import RetrievalOut

log = logging.getLogger("radcohort.retrievals")



def create_retrieval(session: Session, node_name: str, query: dict, actor: str) -> Retrieval:
    """A queued retrieval (validated node and query); the caller commits and then submits it."""
    node = get_node(session, node_name)
    q = validate_query(query)
    if not any(v for v in q.values()):
        raise InvalidInput("query: give at least one matching value (a whole-PACS retrieval is refused)")
    r = Retrieval(node_name=node.name, query=q, method=node.retrieve_method, status="queued", expected=0,
                  received=0, skipped=0, failed=0, missing=[], failed_uids=[], report={})
    session.add(r)
    session.flush()
    audit.record(session, actor, "retrieval.create", str(r.id), node=node.name, query_keys=sorted(q))
    return r


def requeue_retrieval(session: Session, retrieval_id: int, actor: str) -> Retrieval:
    """Queue a finished retrieval again: it lists anew and fetches only what is not indexed."""
    r = get_retrieval(session, retrieval_id)
    if r.status in ("queued", "running", "paused"):  # paused: its runner is still waiting
        raise Conflict(f"retrieval {retrieval_id} is {r.status}")
    r.status = "queued"
    r.error = None
    session.flush()
    audit.record(session, actor, "retrieval.retry", str(r.id), node=r.node_name)
    return r


def get_retrieval(session: Session, retrieval_id: int) -> Retrieval:
    r = session.get(Retrieval, retrieval_id)
    if r is None:
        raise NotFound(f"no retrieval {retrieval_id}")
    return r


def list_retrievals(session: Session, limit: int = 50, offset: int = 0) -> tuple[list[Retrieval], int]:
    total = session.scalar(select(func.count()).select_from(Retrieval)) or 0
    rows = session.scalars(select(Retrieval).order_by(Retrieval.created_at.desc(), Retrieval.id.desc())
                           .limit(limit).offset(offset))
    return list(rows), int(total)


def to_out(r: Retrieval) -> RetrievalOut:
    return RetrievalOut(id=r.id, node=r.node_name, query=r.query or {}, method=r.method, status=r.status,
                        expected=r.expected or 0, received=r.received or 0, skipped=r.skipped or 0,
                        failed=r.failed or 0, missing=list(r.missing or []), error=r.error,
                        report=r.report or {}, created_at=r.created_at, started_at=r.started_at,
                        finished_at=r.finished_at)


# ---------------------------------------------------------------- running them: durable jobs (app.jobs)
def queue_retrieval(session: Session, retrieval_id: int, actor: str | None = None) -> int:
    """Queue the retrieval's job (kind "retrieval") in the caller's transaction; returns the job id.
    The caller wakes the local runner after commit (app.jobs.runner.wake_after_commit)."""
    from app.jobs.queue import enqueue

    return enqueue(session, "retrieval", {"retrieval_id": retrieval_id}, target=f"retrieval:{retrieval_id}",
                   actor=actor).id


def run_retrieval_job(ctx: AppContext, retrieval_id: int) -> dict:
    """The retrieval job's body: run it under its own lease (app.retrievals.lease) unless it has ended
    already (a duplicate job, or an earlier attempt that died after finishing it)."""
    from app.retrievals.lease import UNFINISHED
    from app.retrievals.runner import run_retrieval

    with ctx.sessions() as s:
        r = s.get(Retrieval, retrieval_id)
        if r is None:
            return {"retrieval_id": retrieval_id, "status": "failed", "error": "the retrieval was deleted"}
        if r.status not in UNFINISHED:
            return {"retrieval_id": retrieval_id, "status": r.status, "note": "had ended already"}
    try:
        r = run_retrieval(ctx, retrieval_id)
    except Exception as exc:  # noqa: BLE001 - never leave a retrieval 'running' behind
        log.exception("retrieval %s crashed", retrieval_id)
        error = f"internal error: {type(exc).__name__}: {exc}"[:4000]
        with ctx.sessions() as s:
            settle_retrieval(s, retrieval_id, "failed", error)
            s.commit()
        return {"retrieval_id": retrieval_id, "status": "failed", "error": error}
    return {"retrieval_id": retrieval_id, "status": r.status, "received": r.received or 0,
            "skipped": r.skipped or 0, "failed": r.failed or 0, "error": r.error}


def settle_retrieval(session: Session, retrieval_id: int, status: str, error: str | None) -> None:
    """Its job ended without the runner recording the end: mark an unfinished retrieval failed / cancelled."""
    from datetime import datetime, timezone

    r = session.get(Retrieval, retrieval_id)
    if r is None or r.status not in ("queued", "running", "paused"):
        return
    r.status = "cancelled" if status == "cancelled" else "failed"
    r.error = (error or status)[:4000]
    r.finished_at = datetime.now(timezone.utc)
    session.flush()


def cancel_for_job(session: Session, retrieval_id: int, actor: str) -> None:
    """A cancel of a running retrieval job is the retrieval's own cancel (it stops at its next boundary)."""
    from app.policy.service import cancel

    r = session.get(Retrieval, retrieval_id)
    if r is not None and r.status in ("queued", "running", "paused"):
        cancel(session, r, actor)


def queue_orphans(ctx: AppContext) -> list[int]:
    """Queue a job for each unfinished retrieval nobody runs (app.retrievals.lease.orphans: e.g. one a CLI or
    a cohort pull ran in its own thread before its process stopped) and that no job is queued or running for.
    A job whose own runner died is taken over by the job claim instead. Run by each runner serving
    the retrieval queue; two racing runners at worst queue two jobs, and the retrieval's lease runs it once."""
    from sqlalchemy import select

    from app.db.base import session_scope
    from app.db.models import Job
    from app.retrievals.lease import orphans

    found = orphans(ctx)
    if not found:
        return []
    queued = []
    with session_scope(ctx.sessions) as s:
        busy = set(s.scalars(select(Job.target).where(Job.kind == "retrieval", Job.status.in_(("queued", "running")),
                                                      Job.target.in_([f"retrieval:{r}" for r in found]))))
        for rid in found:
            if f"retrieval:{rid}" not in busy:
                log.warning("retrieval %s was left unfinished by a stopped process: queueing it again", rid)
                queue_retrieval(s, rid, "system")
                queued.append(rid)
    return queued
