"""Batch scoring: every indexed radiograph through one trained model, as a job of `radcohort worker` (no torch).

A scoring job is a row of `scoring_jobs`, queued by the API and claimed by a worker with the training queue's
own claim/lease functions (app.training.jobs with `table=ScoringJob`: compare-and-set claims, SKIP LOCKED on
PostgreSQL, heartbeats, stale reclaim, cancel, release). The worker runs it in a child process
(app.training.score_run) that reads the index in keyset pages, decodes and classifies in batches, and writes each
batch's results to `instance_scores` in the same transaction as the job's progress and cursor, guarded by
its claim: a worker that lost the job can write nothing, and a reclaimed job resumes after the last batch
written. Services only flush; the caller commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import audit
from app.config import Settings
from app.db.models import Instance, InstanceScore, ScoringJob, TrainedModel
from app.errors import Conflict, NotFound
from app.training import jobs, workers
from app.training.predict import XRAY_MODALITIES, get_model, model_body_parts

FINAL = jobs.FINAL
ACTIVE = ("queued", "running")
PAGE = 512  # index rows per read
ERROR_LEN = 255


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def run_dir(settings: Settings, job_id: int) -> Path:
    return settings.runs_dir / f"scoring-{job_id}"


# ---------------------------------------------------------------- user side
def active_job(session: Session, model_id: int) -> ScoringJob | None:
    return session.scalar(select(ScoringJob).where(ScoringJob.model_id == model_id, ScoringJob.status.in_(ACTIVE))
                          .order_by(ScoringJob.id.desc()).limit(1))


def create_job(session: Session, settings: Settings, model_id: int, actor: str, *,
               batch_size: int | None = None) -> ScoringJob:
    """Queue scoring of every indexed CR/DX/DR instance with the model; 409 while one is queued or running."""
    model = get_model(session, model_id)
    if not (settings.data_dir / model.path).is_file():
        raise NotFound("the model's artifacts are missing from the data directory")
    running = active_job(session, model_id)
    if running is not None:
        raise Conflict(f"model {model_id} is already being scored by scoring job {running.id} ({running.status}); "
                       f"cancel it first (POST /api/v1/models/{model_id}/scoring-job/cancel)")
    job = ScoringJob(model_id=model_id, status="queued", total=0, done=0, failed=0, progress={},
                     params={"modalities": list(XRAY_MODALITIES), "batch_size": batch_size})
    session.add(job)
    session.flush()
    audit.record(session, actor, "scoring_job.create", f"scoring_job:{job.id}", model_id=model_id)
    return job


def latest_job(session: Session, model_id: int) -> ScoringJob:
    get_model(session, model_id)
    job = session.scalar(select(ScoringJob).where(ScoringJob.model_id == model_id)
                         .order_by(ScoringJob.id.desc()).limit(1))
    if job is None:
        raise NotFound(f"model {model_id} has no scoring job: start one with POST /api/v1/models/{model_id}/scores")
    return job


def list_jobs(session: Session, *, model_id: int | None = None, status: str | None = None,
              limit: int = 100, offset: int = 0) -> tuple[int, list[ScoringJob]]:
    """Newest first."""
    where = []
    if model_id is not None:
        where.append(ScoringJob.model_id == model_id)
    if status:
        where.append(ScoringJob.status == status)
    total = session.scalar(select(func.count()).select_from(ScoringJob).where(*where)) or 0
    q = select(ScoringJob).where(*where).order_by(ScoringJob.id.desc()).limit(limit).offset(offset)
    return total, list(session.scalars(q))


def cancel_job(session: Session, model_id: int, actor: str) -> ScoringJob:
    """The model's latest job: queued -> cancelled at once; running -> cancel_requested (stops after its batch)."""
    job = latest_job(session, model_id)
    if job.status in FINAL:
        raise Conflict(f"scoring job {job.id} of model {model_id} is already {job.status}")
    was = job.status
    res = session.execute(update(ScoringJob).where(ScoringJob.id == job.id, ScoringJob.status == "queued")
                          .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    if res.rowcount == 0:
        session.execute(update(ScoringJob).where(ScoringJob.id == job.id, ScoringJob.status == "running")
                        .values(cancel_requested=True))
    session.flush()
    session.refresh(job)
    audit.record(session, actor, "scoring_job.cancel", f"scoring_job:{job.id}", status_before=was,
                 status_after=job.status)
    return job


def note(session: Session, job: ScoringJob) -> str | None:
    if job.status == "queued" and not workers.any_alive(session):
        return workers.NO_WORKER_NOTE
    return None


def job_view(job: ScoringJob) -> dict:
    p = job.progress or {}
    return {
        "id": job.id, "model_id": job.model_id, "status": job.status, "params": job.params or {},
        "total": job.total, "done": job.done, "scored": job.done - job.failed, "failed": job.failed,
        "out_of_domain": p.get("out_of_domain", 0), "images_per_second": p.get("images_per_second"),
        "eta_seconds": p.get("eta_seconds"), "device": p.get("device"), "error": job.error,
        "cancel_requested": job.cancel_requested, "attempts": job.attempts, "note": None,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
    }


def score_view(row: InstanceScore) -> dict:
    return {"model_id": row.model_id, "sop_instance_uid": row.sop_instance_uid,
            "predicted_class": row.predicted_class, "confidence": row.confidence, "in_domain": row.in_domain,
            "error": row.error, "job_id": row.job_id, "scored_at": row.scored_at}


def model_scores(session: Session, model_id: int, *, sop_instance_uid: str | None = None,
                 predicted_class: str | None = None, in_domain: bool | None = None, failed: bool | None = None,
                 limit: int = 100, offset: int = 0) -> tuple[int, list[InstanceScore]]:
    """One model's scores, in SOP Instance UID order."""
    get_model(session, model_id)
    where = [InstanceScore.model_id == model_id]
    if sop_instance_uid:
        where.append(InstanceScore.sop_instance_uid == sop_instance_uid)
    if predicted_class:
        where.append(InstanceScore.predicted_class == predicted_class)
    if in_domain is not None:
        where.append(InstanceScore.in_domain == in_domain)
    if failed is not None:
        where.append(InstanceScore.error.is_not(None) if failed else InstanceScore.error.is_(None))
    total = session.scalar(select(func.count()).select_from(InstanceScore).where(*where)) or 0
    q = (select(InstanceScore).where(*where).order_by(InstanceScore.sop_instance_uid)
         .limit(limit).offset(offset))
    return total, list(session.scalars(q))


def instance_scores(session: Session, sop_instance_uid: str) -> list[dict]:
    """Every model's score of one instance, newest model first (404 when neither indexed nor scored)."""
    q = (select(InstanceScore, TrainedModel.architecture, TrainedModel.job_id)
         .join(TrainedModel, TrainedModel.id == InstanceScore.model_id)
         .where(InstanceScore.sop_instance_uid == sop_instance_uid).order_by(InstanceScore.model_id.desc()))
    rows = [{**score_view(s), "architecture": arch, "training_job_id": tj} for s, arch, tj in session.execute(q)]
    if not rows and session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)) is None:
        raise NotFound(f"instance {sop_instance_uid} not found")
    return rows


# ---------------------------------------------------------------- worker side
def claim_next(session: Session, worker_id: str, *, stale_after: float = jobs.DEFAULT_STALE_SECONDS,
               max_attempts: int = jobs.DEFAULT_MAX_ATTEMPTS) -> ScoringJob | None:
    return jobs.claim_next(session, worker_id, stale_after=stale_after, max_attempts=max_attempts, table=ScoringJob)


def _scored_where(modalities: list[str]) -> list:
    return [Instance.modality.in_(modalities)]


def build_spec(session: Session, settings: Settings, job: ScoringJob, worker_id: str) -> dict:
    """What the scoring child needs (no secrets: it gets the database URL from its environment), and the job's
    total: what it already did plus what is left after its cursor."""
    model = session.get(TrainedModel, job.model_id)
    if model is None:
        raise NotFound(f"model {job.model_id} of scoring job {job.id} not found")
    params = job.params or {}
    modalities = list(params.get("modalities") or XRAY_MODALITIES)
    progress = job.progress or {}
    cursor = int(progress.get("cursor") or 0)
    left = session.scalar(select(func.count()).select_from(Instance)
                          .where(*_scored_where(modalities), Instance.id > cursor)) or 0
    total = (job.done or 0) + left
    session.execute(update(ScoringJob).where(*jobs._owned(job.id, worker_id, ScoringJob)).values(total=total))
    return {
        "job_id": job.id, "worker_id": worker_id, "model_id": model.id,
        "model_path": str((settings.data_dir / model.path).resolve()),
        "store_dir": str(settings.store_dir.resolve()), "cache_dir": str(settings.cache_dir.resolve()),
        "modalities": modalities, "xray_modalities": list(XRAY_MODALITIES),
        "body_parts": sorted(model_body_parts(session, model)), "batch_size": params.get("batch_size"),
        "total": total, "resume": {"cursor": cursor, "done": job.done or 0, "failed": job.failed or 0,
                                   "out_of_domain": int(progress.get("out_of_domain") or 0)},
    }


def iter_pages(sessions: sessionmaker[Session], modalities: list[str], *, after: int = 0,
               page: int = PAGE) -> Iterator[list[tuple[int, str, str, str | None, str | None]]]:
    """The index in instance-id order, `page` rows per short read (keyset: no long transaction, no OFFSET):
    (id, sop_instance_uid, file_path, modality, label_body_part)."""
    cursor = after
    while True:
        with sessions() as s:
            rows = s.execute(select(Instance.id, Instance.sop_instance_uid, Instance.file_path, Instance.modality,
                                    Instance.label_body_part)
                             .where(*_scored_where(modalities), Instance.id > cursor)
                             .order_by(Instance.id).limit(page)).all()
        if not rows:
            return
        yield [tuple(r) for r in rows]
        cursor = rows[-1][0]


def _upsert(session: Session, rows: list[dict]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(InstanceScore)
    cols = ("predicted_class", "confidence", "in_domain", "error", "job_id", "scored_at")
    stmt = stmt.on_conflict_do_update(index_elements=["model_id", "sop_instance_uid"],
                                      set_={c: stmt.excluded[c] for c in cols})
    session.execute(stmt, rows)


def write_batch(session: Session, job_id: int, worker_id: str, model_id: int, results: list[dict], *,
                cursor: int, done: int, failed: int, progress: dict) -> tuple[bool, bool]:
    """A batch's scores and the job's new counters and cursor, in the caller's transaction, only while the
    job is still this worker's. `results`: {sop_instance_uid, predicted_class, confidence, in_domain, error}.
    Returns (still ours, cancel requested); when not ours nothing was written."""
    owned, cancel = jobs.heartbeat(session, job_id, worker_id, ScoringJob, done=done, failed=failed,
                                   progress={**progress, "cursor": cursor})
    if not owned:
        return False, False
    if results:
        now = utcnow()
        _upsert(session, [{"model_id": model_id, "job_id": job_id, "scored_at": now, **r,
                           "error": (r.get("error") or None) and str(r["error"])[:ERROR_LEN]} for r in results])
    return True, cancel


def complete_job(session: Session, job_id: int, worker_id: str) -> bool:
    res = session.execute(update(ScoringJob).where(*jobs._owned(job_id, worker_id, ScoringJob))
                          .values(status="completed", finished_at=utcnow(), heartbeat_at=utcnow(), error=None))
    return res.rowcount == 1
