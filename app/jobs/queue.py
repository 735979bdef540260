"""The jobs table's operations: enqueue, claim (compare-and-set), heartbeat, finish, cancel, read.

Every write a runner makes is guarded by its lease (runner_id and attempts), so a runner that lost a job
(stale heartbeat, taken over elsewhere) can never overwrite the new holder's state. Services flush; the
caller commits.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta, timezone

from typing import Any, cast

from sqlalchemy import CursorResult, and_, func, or_, select, update
from sqlalchemy.orm import Session

from app import audit
from app.db.models import Job
from app.errors import Conflict, InvalidInput, NotFound

# queues of the jobs table; "training" is the training/scoring queue of app.training.jobs
QUEUES = ("probe", "cohort", "export", "worklist", "retrieval")
ALL_QUEUES = (*QUEUES, "training")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a job whose runner died this many times is failed, not retried again


def _rows(result: Any) -> int:
    """Rows an UPDATE matched (the compare-and-set's verdict)."""
    return cast(CursorResult, result).rowcount


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_runner_id() -> str:
    """host:pid:random, unique per runner."""
    return f"{socket.gethostname()[:48]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def parse_queues(text: str | None) -> list[str]:
    """'probe,export' -> ['probe', 'export']; None or 'all' -> every queue. InvalidInput names the unknown."""
    if not text or text.strip() == "all":
        return list(ALL_QUEUES)
    names = [q.strip() for q in text.split(",") if q.strip()]
    unknown = sorted(set(names) - set(ALL_QUEUES))
    if unknown or not names:
        raise InvalidInput(f"queues: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(ALL_QUEUES)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------- asking for work
def enqueue(session: Session, kind: str, payload: dict, *, target: str | None = None,
            actor: str | None = None) -> Job:
    """Add a queued job of a registered kind (flushes; the caller commits, then may wake a local runner)."""
    from app.jobs.handlers import get_handler

    h = get_handler(kind)
    job = Job(kind=kind, queue=h.queue, target=target, payload=payload, status="queued", progress={},
              actor=actor, cancel_requested=False, attempts=0)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def latest_for(session: Session, target: str, kind: str | None = None) -> Job | None:
    """The newest job working on `target` ("export:7")."""
    q = select(Job).where(Job.target == target)
    if kind:
        q = q.where(Job.kind == kind)
    return session.scalar(q.order_by(Job.id.desc()).limit(1))


def list_jobs(session: Session, *, kind: str | None = None, queue: str | None = None, status: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[int, list[Job]]:
    """Newest first."""
    where = []
    if kind:
        where.append(Job.kind == kind)
    if queue:
        where.append(Job.queue == queue)
    if status:
        where.append(Job.status == status)
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.scalars(select(Job).where(*where).order_by(Job.id.desc()).limit(limit).offset(offset))
    return int(total), list(rows)


def cancel_job(session: Session, job_id: int, actor: str) -> Job:
    """Queued -> cancelled at once; running -> cancel_requested (its handler stops at its next checkpoint)."""
    from app.jobs.handlers import get_handler

    job = get_job(session, job_id)
    if job.status in FINAL:
        raise Conflict(f"job {job_id} is already {job.status}")
    was = job.status
    # guarded: a claim racing with the cancel cannot be lost; whichever write lands second sees the first
    res = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                          .values(status="cancelled", cancel_requested=True, finished_at=utcnow(),
                                  error="cancelled before it started"))
    if _rows(res) == 0:
        session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    session.flush()
    session.refresh(job)
    h = get_handler(job.kind)
    if job.status == "cancelled" and h.settle is not None:
        h.settle(session, job, "cancelled", "cancelled before it started")
    elif job.status == "running" and h.on_cancel is not None:
        h.on_cancel(session, job, actor)
    audit.record(session, actor, "job.cancel", f"job:{job_id}", kind=job.kind, status_before=was,
                 status_after=job.status)
    session.flush()
    return job


# ---------------------------------------------------------------- the runner's side
def _stale(cutoff):
    return and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff))


def claim_next(session: Session, runner_id: str, queue: str, *, stale_after: float,
               max_attempts: int = MAX_ATTEMPTS) -> Job | None:
    """Claim the oldest queued job of `queue`, or a running one whose runner stopped heartbeating.

    PostgreSQL reads candidates `FOR UPDATE SKIP LOCKED`, so concurrent runners pass over each other's rows;
    on both backends the claim itself is a compare-and-set UPDATE on (status, attempts), so two claimers can
    never both win one job. A dead runner's job that was being cancelled ends cancelled; one whose runners
    died `max_attempts` times ends failed. The caller commits at once.
    """
    from app.jobs.handlers import find_handler

    now = utcnow()
    stale = _stale(now - timedelta(seconds=stale_after))
    q = (select(Job.id, Job.status, Job.attempts, Job.cancel_requested)
         .where(Job.queue == queue, or_(Job.status == "queued", stale)).order_by(Job.id).limit(8))
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    for job_id, status, attempts, cancel_requested in session.execute(q).all():
        guard = [Job.id == job_id, Job.attempts == attempts, (Job.status == "queued") if status == "queued" else stale]
        if status == "running" and (cancel_requested or attempts >= max_attempts):
            end, error = (("cancelled", "cancelled; its runner stopped") if cancel_requested else
                          ("failed", f"its runner was lost {attempts} times (killed or stalled); not retried again"))
            if _rows(session.execute(update(Job).where(*guard).values(status=end, error=error, runner_id=None,
                                                                      finished_at=now))) == 1:
                job = session.get(Job, job_id, populate_existing=True)
                h = find_handler(job.kind) if job is not None else None
                if job is not None and h is not None and h.settle is not None:
                    h.settle(session, job, end, error)
            continue
        previous = None
        if status == "running":
            previous = session.scalar(select(Job.runner_id).where(Job.id == job_id))
        res = session.execute(update(Job).where(*guard).values(
            status="running", runner_id=runner_id, heartbeat_at=now, attempts=attempts + 1,
            started_at=func.coalesce(Job.started_at, now), error=None))
        if _rows(res) == 1:
            if previous:
                audit.record(session, "system", "job.takeover", f"job:{job_id}", previous_runner=previous,
                             runner=runner_id)
            session.flush()
            return session.get(Job, job_id, populate_existing=True)
    return None


def _owned(job_id: int, runner_id: str, attempts: int) -> list:
    return [Job.id == job_id, Job.runner_id == runner_id, Job.attempts == attempts, Job.status == "running"]


def heartbeat(session: Session, runner_id: str, leases: dict[int, int]) -> dict[int, tuple[bool, bool]]:
    """Renew the leases {job id: attempts} this runner holds: {job id: (still ours, cancel requested)}."""
    if not leases:
        return {}
    session.execute(update(Job).where(Job.id.in_(list(leases)), Job.runner_id == runner_id,
                                      Job.status == "running").values(heartbeat_at=utcnow()))
    rows = {i: (r, a, s, c) for i, r, a, s, c in session.execute(
        select(Job.id, Job.runner_id, Job.attempts, Job.status, Job.cancel_requested).where(Job.id.in_(list(leases))))}
    out = {}
    for jid, attempts in leases.items():
        r = rows.get(jid)
        ours = r is not None and r[0] == runner_id and r[1] == attempts and r[2] == "running"
        out[jid] = (ours, bool(r is not None and ours and r[3]))
    return out


def set_progress(session: Session, job_id: int, runner_id: str, attempts: int, progress: dict) -> bool:
    return _rows(session.execute(update(Job).where(*_owned(job_id, runner_id, attempts))
                                 .values(progress=progress, heartbeat_at=utcnow()))) == 1


def finish(session: Session, job_id: int, runner_id: str, attempts: int, status: str, *,
           result: dict | None = None, error: str | None = None) -> bool:
    """End a held job (succeeded, failed or cancelled); False when the lease was lost meanwhile."""
    assert status in FINAL
    values = {"status": status, "finished_at": utcnow(), "heartbeat_at": utcnow(),
              "error": error[:8000] if error else None}
    if result is not None:
        values["result"] = result
    return _rows(session.execute(update(Job).where(*_owned(job_id, runner_id, attempts)).values(**values))) == 1


def release(session: Session, job_id: int, runner_id: str, attempts: int) -> bool:
    """Give a held job back to the queue (its runner is stopping); the next claim runs it again."""
    return _rows(session.execute(update(Job).where(*_owned(job_id, runner_id, attempts))
                                 .values(status="queued", runner_id=None, heartbeat_at=None))) == 1


# ---------------------------------------------------------------- the API's shape
def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


def view(job: Job) -> dict:
    return {"id": job.id, "kind": job.kind, "queue": job.queue, "target": job.target, "status": job.status,
            "payload": job.payload or {}, "progress": job.progress or {}, "result": job.result, "error": job.error,
            "cancel_requested": bool(job.cancel_requested), "attempts": job.attempts, "runner": job.runner_id,
            "heartbeat_at": _aware(job.heartbeat_at), "created_at": _aware(job.created_at),
            "started_at": _aware(job.started_at), "finished_at": _aware(job.finished_at)}
