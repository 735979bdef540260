"""Training job records: create, list, cancel, claim (shared queue), heartbeat, progress and completion.

Services only flush; the caller (an API request or the worker loop) commits. Every write the worker makes
is guarded by its worker_id, so a worker that lost its claim (stale heartbeat, reclaimed elsewhere) can never
overwrite the new owner's state.
"""

from __future__ import annotations

import difflib
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app import audit
from app.config import Settings
from app.db.models import Cohort, TrainedModel, TrainingJob
from app.errors import Conflict, InvalidInput, NotFound
from app.training.items import cohort_classes, cohort_items
from app.training import workers
from app.training.params import DEPTH_PRESETS, TrainingJobCreate
from models.spec import RunParams, RunSpec, SpecItem, SpecMeta

FINAL = ("completed", "failed", "cancelled")
DEFAULT_STALE_SECONDS = 60.0
DEFAULT_MAX_ATTEMPTS = 3
HISTORY_KEYS = ("epoch", "loss", "train_accuracy", "val_accuracy", "images_per_second", "eta_seconds")
SKIPPED_KEEP = 1000  # skipped-instance reports kept on the job row (the run dir has them all)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RequestInvalid(InvalidInput):
    """A training request the worker would fail on; `errors` in FastAPI's 422 shape."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors))
        self.errors = errors


def _err(field: str, msg: str, **ctx) -> dict:
    return {"loc": ["body", field], "msg": msg, "type": "value_error", **({"ctx": ctx} if ctx else {})}


def check_request(session: Session, body: TrainingJobCreate) -> Cohort:
    """What the worker would only find out late: an unknown model, a cohort it cannot train and test.

    Models are checked against the registries the live workers published (every timm name), or the
    built-in list while no worker is alive; both without importing torch.
    """
    cohort = session.get(Cohort, body.cohort_id)
    if cohort is None:
        raise NotFound(f"cohort {body.cohort_id} not found")
    errors = []
    if body.depth is None:
        offered, source = workers.offered_models(session)
        if body.model not in offered:
            close = difflib.get_close_matches(body.model, offered, n=5, cutoff=0.6)
            shown = offered if len(offered) <= 40 else close
            where = ("the live workers' registry" if source == "workers"
                     else "the built-in list (no worker is running; a running worker offers every timm model)")
            msg = (f"unknown model {body.model!r}: not in {where}"
                   + (f"; did you mean {', '.join(close)}?" if close else "")
                   + (f"; allowed: {', '.join(offered)}" if len(offered) <= 40 else
                      f"; {len(offered)} allowed, listed by GET /api/v1/architectures or `radcohort models list --architectures`"))
            errors.append(_err("model", msg, allowed=shown, source=source))
    summary = (cohort.summary or {}).get("classes") or []
    tested = [c["name"] for c in summary if c.get("test")]
    trained = [c["name"] for c in summary if c.get("train")]
    if len(tested) < 2 or len(trained) < 2:
        counts = ", ".join(f"{c.get('name')} {c.get('train', 0)}/{c.get('test', 0)}" for c in summary) or "none"
        errors.append(_err("cohort_id", f"cohort {cohort.id} has {len(trained)} class(es) with training images and "
                           f"{len(tested)} with test images (train/test per class: {counts}); a classifier needs "
                           "at least 2 of each: use a taxonomy with 2+ classes, a larger per_class or more images"))
    if errors:
        raise RequestInvalid(errors)
    return cohort


# ---------------------------------------------------------------- user side
def create_jobs(session: Session, body: TrainingJobCreate, actor: str) -> list[TrainingJob]:
    """Queue one job, or one per depth preset when the depth_ladder experiment is asked for."""
    check_request(session, body)
    params = body.params()
    if "depth_ladder" in params.experiments:
        rest = [e for e in params.experiments if e != "depth_ladder"]
        variants = [params.model_copy(update={"depth": d, "experiments": rest}) for d in DEPTH_PRESETS]
    else:
        variants = [params]
    jobs = [TrainingJob(cohort_id=body.cohort_id, status="queued", params=p.to_config(),
                        epochs=p.epochs, progress={}, history=[]) for p in variants]
    session.add_all(jobs)
    session.flush()
    if len(jobs) > 1:
        ids = [j.id for j in jobs]
        for j in jobs:  # the ladder's members know each other, for side-by-side results
            j.params = {**j.params, "depth_ladder": ids}
    for j in jobs:
        audit.record(session, actor, "training_job.create", f"training_job:{j.id}",
                     cohort_id=body.cohort_id, model=j.params["model"], depth=j.params["depth"],
                     epochs=j.epochs)
    session.flush()
    return jobs


def get_job(session: Session, job_id: int) -> TrainingJob:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise NotFound(f"training job {job_id} not found")
    return job


def list_jobs(session: Session, *, status: str | None = None, cohort_id: int | None = None,
              limit: int = 100, offset: int = 0) -> tuple[int, list[TrainingJob]]:
    """Newest first."""
    where = []
    if status:
        where.append(TrainingJob.status == status)
    if cohort_id is not None:
        where.append(TrainingJob.cohort_id == cohort_id)
    total = session.scalar(select(func.count()).select_from(TrainingJob).where(*where)) or 0
    q = select(TrainingJob).where(*where).order_by(TrainingJob.id.desc()).limit(limit).offset(offset)
    return total, list(session.scalars(q))


def cancel_job(session: Session, job_id: int, actor: str) -> TrainingJob:
    """Queued -> cancelled at once; running -> cancel_requested (the worker stops the run)."""
    job = get_job(session, job_id)
    if job.status in FINAL:
        raise Conflict(f"training job {job_id} is already {job.status}")
    was = job.status
    # guarded so a claim racing with the cancel cannot be lost: whichever write lands second sees the first
    res = session.execute(update(TrainingJob)
                          .where(TrainingJob.id == job_id, TrainingJob.status == "queued")
                          .values(status="cancelled", cancel_requested=True, finished_at=utcnow()))
    if res.rowcount == 0:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "running")
                        .values(cancel_requested=True))
    session.flush()
    session.refresh(job)
    audit.record(session, actor, "training_job.cancel", f"training_job:{job_id}", status_before=was,
                 status_after=job.status)
    return job


def model_ids(session: Session, job_ids: list[int]) -> dict[int, int]:
    if not job_ids:
        return {}
    q = select(TrainedModel.job_id, TrainedModel.id).where(TrainedModel.job_id.in_(job_ids))
    return {jid: mid for jid, mid in session.execute(q)}


def note(session: Session, job: TrainingJob) -> str | None:
    """Why a queued job is not moving, when the reason is known."""
    if job.status == "queued" and not workers.any_alive(session):
        return workers.NO_WORKER_NOTE
    return None


def job_view(job: TrainingJob, model_id: int | None = None) -> dict:
    """The API's shape of a job (progress flattened for the UI)."""
    p = job.progress or {}
    skipped = p.get("skipped") or []
    return {
        "id": job.id, "status": job.status, "cohort_id": job.cohort_id, "params": job.params,
        "epoch": job.epoch, "epochs": job.epochs, "device": job.device,
        "images_per_second": job.images_per_second, "loss": p.get("loss"),
        "train_accuracy": p.get("train_accuracy"), "val_accuracy": p.get("val_accuracy"),
        "eta_seconds": p.get("eta_seconds"), "preprocess": p.get("preprocess"),
        "skipped": skipped, "skipped_count": p.get("skipped_count", len(skipped)),
        "history": job.history or [], "error": job.error, "cancel_requested": job.cancel_requested,
        "attempts": job.attempts, "model_id": model_id, "note": None,
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
    }


def ladder(session: Session, job_id: int) -> list[dict]:
    """The depth-ladder jobs queued with this one, side by side (status and headline accuracies)."""
    job = get_job(session, job_id)
    ids = (job.params or {}).get("depth_ladder")
    if not ids:
        raise NotFound(f"training job {job_id} is not part of a depth ladder")
    rows = {j.id: j for j in session.scalars(select(TrainingJob).where(TrainingJob.id.in_(ids)))}
    out = []
    for jid in ids:
        j = rows.get(jid)
        if j is None:
            continue
        m = j.metrics or {}
        out.append({
            "id": j.id, "depth": j.params.get("depth"), "status": j.status,
            "overall_accuracy": m.get("overall_accuracy"),
            "per_class_accuracy": {r["class"]: r.get("accuracy") for r in m.get("per_class") or []},
            "experiments": {k: v.get("overall_accuracy") for k, v in (m.get("experiments") or {}).items()
                            if isinstance(v, dict)},
        })
    return out


# ---------------------------------------------------------------- worker side
# The queue: claim / heartbeat / fail / cancel / release work on any job table with the lease columns
# (status, worker_id, heartbeat_at, attempts, cancel_requested, error, started_at, finished_at):
# training_jobs, and scoring_jobs (app.training.scoring) through `table=`.
def claim_next(session: Session, worker_id: str, *, stale_after: float = DEFAULT_STALE_SECONDS,
               max_attempts: int = DEFAULT_MAX_ATTEMPTS, table=TrainingJob):
    """Claim the oldest queued job, or a running one whose worker stopped heartbeating.

    PostgreSQL: candidates are read `FOR UPDATE SKIP LOCKED`, so concurrent workers pass over each other's
    rows instead of queueing behind them. Both backends: the claim itself is a compare-and-set UPDATE on
    (status, attempts), so two claimers can never both win one job. The caller commits at once.
    """
    T = table
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after)
    stale = and_(T.status == "running", T.heartbeat_at < cutoff)
    claimable = or_(T.status == "queued", stale)
    q = (select(T.id, T.status, T.attempts, T.cancel_requested)
         .where(claimable).order_by(T.id).limit(8))
    if session.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    for job_id, status, attempts, cancel_requested in session.execute(q).all():
        guard = [T.id == job_id, T.attempts == attempts,
                 (T.status == "queued") if status == "queued" else stale]
        if status == "running" and (cancel_requested or attempts >= max_attempts):
            # a dead worker's job that was being cancelled, or one that keeps killing workers: close it
            values = ({"status": "cancelled"} if cancel_requested else
                      {"status": "failed", "error": f"worker lost {attempts} times (killed or stalled); "
                                                    "not retried again"})
            session.execute(update(T).where(*guard)
                            .values(worker_id=None, finished_at=now, **values))
            continue
        res = session.execute(
            update(T).where(*guard).values(
                status="running", worker_id=worker_id, heartbeat_at=now, attempts=attempts + 1,
                started_at=func.coalesce(T.started_at, now), error=None))
        if res.rowcount == 1:
            session.flush()
            return session.get(T, job_id, populate_existing=True)
    return None


def _owned(job_id: int, worker_id: str, table=TrainingJob) -> list:
    return [table.id == job_id, table.worker_id == worker_id, table.status == "running"]


def heartbeat(session: Session, job_id: int, worker_id: str, table=TrainingJob, **values) -> tuple[bool, bool]:
    """Refresh the claim (and write progress fields). Returns (still ours, cancel requested)."""
    res = session.execute(update(table).where(*_owned(job_id, worker_id, table))
                          .values(heartbeat_at=utcnow(), **values))
    if res.rowcount != 1:
        return False, False
    cancel = session.scalar(select(table.cancel_requested).where(table.id == job_id))
    return True, bool(cancel)


def fold_events(job: TrainingJob, events: list[dict]) -> dict:
    """Fold progress.jsonl events into the job's progress fields (pure; idempotent on replays).

    History is keyed by epoch, so events replayed after a resume replace rather than duplicate.
    """
    progress = dict(job.progress or {})
    history = {h["epoch"]: h for h in (job.history or []) if isinstance(h, dict) and "epoch" in h}
    out: dict = {"epoch": job.epoch, "device": job.device, "images_per_second": job.images_per_second}
    skipped = {s["sop_instance_uid"]: s for s in progress.get("skipped") or []}
    skipped_count = progress.get("skipped_count", len(skipped))
    for ev in events:
        kind = ev.get("event")
        if kind == "preprocess":
            progress["preprocess"] = {"done": ev.get("done"), "total": ev.get("total")}
        elif kind == "epoch" and isinstance(ev.get("epoch"), int):
            entry = {k: ev.get(k) for k in HISTORY_KEYS}
            history[ev["epoch"]] = entry
            for k in ("loss", "train_accuracy", "val_accuracy", "eta_seconds"):
                progress[k] = ev.get(k)
            out["epoch"] = ev["epoch"]
            out["device"] = ev.get("device") or out["device"]
            out["images_per_second"] = ev.get("images_per_second")
        elif kind == "skipped" and ev.get("sop_instance_uid"):
            uid = ev["sop_instance_uid"]
            if uid not in skipped:
                skipped_count += 1
                if len(skipped) < SKIPPED_KEEP:
                    skipped[uid] = {"sop_instance_uid": uid, "reason": ev.get("reason")}
        elif kind == "resume":
            progress["resumed_from_epoch"] = ev.get("from_epoch")
            # epochs checkpointed but never reported (the worker died in between), when the run sends them
            for h in ev.get("history") or []:
                if isinstance(h, dict) and isinstance(h.get("epoch"), int):
                    history.setdefault(h["epoch"], {k: h.get(k) for k in HISTORY_KEYS})
        elif kind == "done":
            progress["done"] = True
            progress["eta_seconds"] = 0
    progress["skipped"] = list(skipped.values())
    progress["skipped_count"] = skipped_count
    out["progress"] = progress
    out["history"] = [history[k] for k in sorted(history)]
    return out


def record_progress(session: Session, job: TrainingJob, worker_id: str, events: list[dict]) -> tuple[bool, bool]:
    """Heartbeat plus the folded events. Returns (still ours, cancel requested)."""
    values = fold_events(job, events) if events else {}
    owned, cancel = heartbeat(session, job.id, worker_id, **values)
    if owned:
        for k, v in values.items():
            setattr(job, k, v)  # keep the caller's (detached) job in step for the next fold
    return owned, cancel


def complete_job(session: Session, job_id: int, worker_id: str, *, metrics: dict, card: dict,
                 architecture: str, classes: list[str], model_path: str) -> TrainedModel | None:
    """Store the metrics and register the model (once per job, even when the run was resumed)."""
    res = session.execute(update(TrainingJob).where(*_owned(job_id, worker_id)).values(
        status="completed", metrics=metrics, finished_at=utcnow(), heartbeat_at=utcnow(), error=None))
    if res.rowcount != 1:
        return None
    job = session.get(TrainingJob, job_id, populate_existing=True)
    job.epoch = max(job.epoch or 0, job.epochs)
    model = session.scalar(select(TrainedModel).where(TrainedModel.job_id == job_id))
    if model is None:
        model = TrainedModel(job_id=job_id, architecture=architecture, classes=classes, path=model_path,
                             card=card)
        session.add(model)
    session.flush()
    return model


def set_run_dir(session: Session, job_id: int, worker_id: str, path: str) -> bool:
    res = session.execute(update(TrainingJob).where(*_owned(job_id, worker_id)).values(run_dir=path))
    return res.rowcount == 1


def fail_job(session: Session, job_id: int, worker_id: str, error: str, table=TrainingJob) -> bool:
    res = session.execute(update(table).where(*_owned(job_id, worker_id, table))
                          .values(status="failed", error=error[:8000], finished_at=utcnow()))
    return res.rowcount == 1


def mark_cancelled(session: Session, job_id: int, worker_id: str, table=TrainingJob) -> bool:
    res = session.execute(update(table).where(*_owned(job_id, worker_id, table))
                          .values(status="cancelled", finished_at=utcnow()))
    return res.rowcount == 1


def release_job(session: Session, job_id: int, worker_id: str, table=TrainingJob) -> bool:
    """Give a claimed job back to the queue (worker shutting down); the next claim resumes it."""
    res = session.execute(update(table).where(*_owned(job_id, worker_id, table))
                          .values(status="queued", worker_id=None, heartbeat_at=None))
    return res.rowcount == 1


# ---------------------------------------------------------------- the run's input
def run_dir(settings: Settings, job_id: int) -> Path:
    return settings.runs_dir / f"job-{job_id}"


def build_spec(session: Session, settings: Settings, job: TrainingJob, code_version: str) -> tuple[dict, list[dict]]:
    """The spec.json content models.run reads (RunSpec, validated here), plus members that have no file
    in the store (reported as skipped)."""
    spec, missing = build_run_spec(session, settings, job, code_version)
    return spec.to_json(), missing


def build_run_spec(session: Session, settings: Settings, job: TrainingJob,
                   code_version: str) -> tuple[RunSpec, list[dict]]:
    """The typed spec of `job`'s run (models/spec.py), plus members without a file in the store."""
    cohort = session.get(Cohort, job.cohort_id)
    if cohort is None:
        raise NotFound(f"cohort {job.cohort_id} of training job {job.id} not found")
    store = settings.store_dir.resolve()
    items, missing = [], []
    for it in cohort_items(session, cohort.id):
        if not it.get("file_path"):
            missing.append({"event": "skipped", "sop_instance_uid": it["sop_instance_uid"],
                            "reason": "no file in the store"})
            continue
        items.append({"sop_instance_uid": it["sop_instance_uid"], "path": str(store / it["file_path"]),
                      "class": it["class_name"], "split": it["split"], "patient_key": it.get("patient_key")})
    val_fraction = float((job.params or {}).get("val_fraction") or 0)
    if val_fraction > 0 and not any(it["split"] == "val" for it in items):
        hold_out_validation(items, val_fraction, int((job.params or {}).get("seed") or 0))
    for it in items:
        it.pop("patient_key", None)  # grouping only; pseudonyms need not sit in the run dir
    rd = run_dir(settings, job.id).resolve()
    params = {k: v for k, v in (job.params or {}).items() if k not in ("depth_ladder", "val_fraction")}
    if params.get("weights"):
        params["weights"] = str((settings.data_dir / "weights" / params["weights"]).resolve())
    spec = RunSpec(
        job_id=job.id, run_dir=str(rd), cache_dir=str(settings.cache_dir.resolve()),
        classes=cohort_classes(cohort), items=[SpecItem.model_validate(it) for it in items],
        params=RunParams.model_validate(params),
        meta=SpecMeta(cohort_id=cohort.id, taxonomy=cohort.taxonomy_name, ruleset_version=cohort.ruleset_version,
                      code_version=code_version),
    )
    return spec, missing


def hold_out_validation(items: list[dict], fraction: float, seed: int) -> int:
    """Move a seeded `fraction` of each class's training patients to split "val" (in place).

    By patient (all of a patient's images move together), per class so every class is monitored;
    a class keeps at least 3 training patients, so tiny classes give none. Returns images moved.
    """
    by_class: dict[str, dict[str, list[dict]]] = {}
    for it in items:
        if it["split"] == "train":
            key = it.get("patient_key") or it["sop_instance_uid"]
            by_class.setdefault(it["class"], {}).setdefault(key, []).append(it)
    rng = random.Random(seed)
    moved = 0
    for cls in sorted(by_class):
        patients = sorted(by_class[cls])
        n = len(patients)
        k = min(max(int(n * fraction), 1 if n >= 5 else 0), n - 3) if n > 3 else 0
        for key in rng.sample(patients, k):
            for it in by_class[cls][key]:
                it["split"] = "val"
                moved += 1
    return moved
