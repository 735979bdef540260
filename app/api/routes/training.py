"""Training jobs: queue, progress, cancel, metrics, report and its artifacts."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, Field

from app.api.deps import ActorDep, SessionDep, SettingsDep
from app.errors import Conflict, NotFound
from app.training import artifacts, jobs, workers
from app.training.params import TrainingJobCreate

router = APIRouter(tags=["training"])

Status = Literal["queued", "running", "completed", "failed", "cancelled"]


class JobQueued(BaseModel):
    id: int
    status: Status
    jobs: list[int] | None = None  # every job queued by a depth_ladder request (id is the first)
    note: str | None = None  # e.g. that no worker is running


class JobOut(BaseModel):
    id: int
    status: Status
    cohort_id: int
    params: dict
    epoch: int
    epochs: int
    device: str | None
    images_per_second: float | None
    loss: float | None
    train_accuracy: float | None
    val_accuracy: float | None
    eta_seconds: float | None
    preprocess: dict | None
    skipped: list[dict]
    skipped_count: int
    history: list[dict]
    error: str | None
    cancel_requested: bool
    attempts: int
    model_id: int | None
    note: str | None = None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    artifacts: list[str] = []


class JobList(BaseModel):
    total: int
    items: list[JobOut]


def _out(session, job, settings=None) -> JobOut:
    view = jobs.job_view(job, jobs.model_ids(session, [job.id]).get(job.id))
    view["note"] = jobs.note(session, job)
    if settings is not None and job.status == "completed":
        view["artifacts"] = artifacts.list_artifacts(jobs.run_dir(settings, job.id))
    return JobOut(**view)


def _completed_run_dir(session, settings, job_id: int, what: str) -> Path:
    job = jobs.get_job(session, job_id)
    if job.status != "completed":
        raise Conflict(f"training job {job_id} is {job.status}: its {what} exists once it has completed")
    return jobs.run_dir(settings, job_id)


@router.post("/training-jobs", status_code=202, response_model=JobQueued, response_model_exclude_none=True,
             responses={404: {"description": "unknown cohort"},
                        422: {"description": "invalid parameters, a model no worker offers (the allowed values "
                                             "in the detail), or a cohort with fewer than 2 trainable classes"}})
def create_training_job(body: TrainingJobCreate, session: SessionDep, actor: ActorDep):
    """Queue a job for a frozen cohort; `experiments: ["depth_ladder"]` queues one job per depth preset.
    `note` says when no worker is running (the job then waits until one starts)."""
    try:
        created = jobs.create_jobs(session, body, actor)
    except jobs.RequestInvalid as exc:
        raise HTTPException(status_code=422, detail=exc.errors) from exc
    first = created[0]
    return JobQueued(id=first.id, status=first.status, jobs=[j.id for j in created] if len(created) > 1 else None,
                     note=jobs.note(session, first))


class ArchitectureList(BaseModel):
    total: int
    items: list[str]
    source: Literal["workers", "built-in"] = Field(
        ..., description="workers: the union of the live workers' registries; built-in: no worker is running")


@router.get("/architectures", response_model=ArchitectureList)
def list_architectures(session: SessionDep, q: str | None = Query(None, description="substring filter"),
                       limit: int = Query(100, ge=1, le=10000), offset: int = Query(0, ge=0)):
    """Model names a training job may ask for (`model`), as the live workers offer them."""
    names, source = workers.offered_models(session)
    if q:
        names = [n for n in names if q.lower() in n]
    return ArchitectureList(total=len(names), items=names[offset:offset + limit], source=source)


@router.get("/training-jobs", response_model=JobList)
def list_training_jobs(session: SessionDep, status: Status | None = None, cohort_id: int | None = None,
                       limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first."""
    total, items = jobs.list_jobs(session, status=status, cohort_id=cohort_id, limit=limit, offset=offset)
    ids = jobs.model_ids(session, [j.id for j in items])
    idle = None if any(j.status == "queued" for j in items) and workers.any_alive(session) else workers.NO_WORKER_NOTE
    return JobList(total=total, items=[JobOut(**{**jobs.job_view(j, ids.get(j.id)),
                                                 "note": idle if j.status == "queued" else None}) for j in items])


@router.get("/training-jobs/{job_id}", response_model=JobOut)
def get_training_job(job_id: int, session: SessionDep, settings: SettingsDep):
    return _out(session, jobs.get_job(session, job_id), settings)


@router.post("/training-jobs/{job_id}/cancel", response_model=JobOut)
def cancel_training_job(job_id: int, session: SessionDep, actor: ActorDep):
    """Queued jobs are cancelled at once; a running one stops at the worker's next check (about 1 s)."""
    return _out(session, jobs.cancel_job(session, job_id, actor))


class LadderRow(BaseModel):
    id: int
    depth: int | None
    status: Status
    overall_accuracy: float | None
    per_class_accuracy: dict[str, float | None]
    experiments: dict[str, float | None]


class Ladder(BaseModel):
    jobs: list[LadderRow]


@router.get("/training-jobs/{job_id}/ladder", response_model=Ladder)
def get_depth_ladder(job_id: int, session: SessionDep):
    """The study's depth experiment side by side: every job of this job's depth ladder (4/19/34/64)."""
    return Ladder(jobs=[LadderRow(**row) for row in jobs.ladder(session, job_id)])


@router.get("/training-jobs/{job_id}/metrics")
def get_training_metrics(job_id: int, session: SessionDep) -> dict:
    """Per-class accuracy and confidence (the study's Table 2), confusion matrix, experiments,
    misclassified instances and header suspects. 409 until the job has completed."""
    job = jobs.get_job(session, job_id)
    if job.status != "completed" or job.metrics is None:
        raise Conflict(f"training job {job_id} is {job.status}: metrics exist once it has completed")
    return job.metrics


@router.get("/training-jobs/{job_id}/report", response_class=PlainTextResponse,
            responses={200: {"content": {"text/markdown": {}}}})
def get_training_report(job_id: int, session: SessionDep, settings: SettingsDep):
    """The run's Markdown report. Its image links point at `artifacts/{name}`, which resolves from this
    URL to the artifact route (on disk they point next to report.md)."""
    rd = _completed_run_dir(session, settings, job_id, "report")
    path = rd / "report.md"
    if not path.is_file():
        raise NotFound(f"training job {job_id} has no report")
    text = artifacts.link_images(path.read_text(errors="replace"), artifacts.list_artifacts(rd))
    return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")


@router.get("/training-jobs/{job_id}/artifacts/{name}", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}, "application/json": {}}}})
def get_training_artifact(job_id: int, name: str, session: SessionDep, settings: SettingsDep):
    """A report file by name (PNG charts, model_card.json, config.json, metrics.json)."""
    rd = _completed_run_dir(session, settings, job_id, "artifacts")
    path = artifacts.artifact_path(rd, name)
    return FileResponse(path, media_type=artifacts.media_type(name))
