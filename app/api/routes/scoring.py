"""Batch scoring: score every indexed radiograph with a model (a worker job), follow it, read the scores."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import ActorDep, CtxDep, SessionDep
from app.training import scoring

router = APIRouter(tags=["models"])

Status = Literal["queued", "running", "completed", "failed", "cancelled"]
_UID = r"^[0-9]+(\.[0-9]+)*$"


class ScoringRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(None, ge=1, le=4096, description="images per forward pass (default: 256 on a "
                                                                    "GPU, 32 on CPU)")


class ScoringQueued(BaseModel):
    id: int
    model_id: int
    status: Status
    note: str | None = None  # e.g. that no worker is running


class ScoringJobOut(BaseModel):
    id: int
    model_id: int
    status: Status
    params: dict
    total: int = Field(description="indexed CR/DX/DR instances to score (counted when a worker claims the job)")
    done: int = Field(description="instances processed so far (scored + failed)")
    scored: int
    failed: int = Field(description="instances whose image could not be decoded (their score row says why)")
    out_of_domain: int = Field(description="scored instances outside the model's domain (in_domain false)")
    images_per_second: float | None
    eta_seconds: float | None
    device: str | None
    error: str | None
    cancel_requested: bool
    attempts: int
    note: str | None = None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class ScoringJobList(BaseModel):
    total: int
    items: list[ScoringJobOut]


class ScoreOut(BaseModel):
    model_id: int
    sop_instance_uid: str
    predicted_class: str | None = Field(description="null when the image could not be decoded (see error)")
    confidence: float | None = Field(description="softmax probability of the predicted class (0..1)")
    in_domain: bool = Field(description="false when the instance is not CR/DX/DR or its body-part label is not one "
                                        "the model has a class for: the class is then a guess")
    error: str | None
    job_id: int | None = Field(description="the scoring job that wrote it")
    scored_at: datetime | None


class ScorePage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[ScoreOut]


class InstanceScoreOut(ScoreOut):
    architecture: str
    training_job_id: int


class InstanceScores(BaseModel):
    sop_instance_uid: str
    total: int
    items: list[InstanceScoreOut]


def _out(session, job) -> ScoringJobOut:
    return ScoringJobOut(**{**scoring.job_view(job), "note": scoring.note(session, job)})


@router.post("/models/{model_id}/scores", status_code=202, response_model=ScoringQueued,
             response_model_exclude_none=True,
             responses={404: {"description": "unknown model, or its checkpoint is missing"},
                        409: {"description": "a scoring job of this model is already queued or running"}})
def start_scoring(model_id: int, session: SessionDep, ctx: CtxDep, actor: ActorDep,
                  body: Annotated[ScoringRequest | None, Body()] = None):
    """Queue a job that scores every indexed CR/DX/DR instance with the model (`radcohort worker` runs it):
    follow it with `GET /models/{id}/scoring-job`, read the results with `GET /models/{id}/scores` or per
    instance with `GET /instances/{uid}/scores`. A later job replaces the model's earlier scores."""
    job = scoring.create_job(session, ctx.settings, model_id, actor,
                             batch_size=body.batch_size if body is not None else None)
    return ScoringQueued(id=job.id, model_id=model_id, status=job.status, note=scoring.note(session, job))


@router.get("/models/{model_id}/scores", response_model=ScorePage,
            responses={404: {"description": "unknown model"}})
def list_scores(model_id: int, session: SessionDep,
                sop_instance_uid: Annotated[str | None, Query(pattern=_UID, max_length=64)] = None,
                predicted_class: Annotated[str | None, Query(max_length=64)] = None,
                in_domain: bool | None = None,
                failed: Annotated[bool | None, Query(description="true: only images that could not be "
                                                                 "decoded; false: only scored ones")] = None,
                limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """The model's scores (SOP Instance UID order), filtered by instance, class or domain."""
    total, rows = scoring.model_scores(session, model_id, sop_instance_uid=sop_instance_uid,
                                       predicted_class=predicted_class, in_domain=in_domain, failed=failed,
                                       limit=limit, offset=offset)
    return ScorePage(total=total, limit=limit, offset=offset, items=[ScoreOut(**scoring.score_view(r)) for r in rows])


@router.get("/models/{model_id}/scoring-job", response_model=ScoringJobOut,
            responses={404: {"description": "unknown model, or it was never scored"}})
def get_scoring_job(model_id: int, session: SessionDep):
    """The model's latest scoring job: status and progress (done / total, images/s, ETA)."""
    return _out(session, scoring.latest_job(session, model_id))


@router.post("/models/{model_id}/scoring-job/cancel", response_model=ScoringJobOut,
             responses={404: {"description": "unknown model, or it was never scored"},
                        409: {"description": "its latest scoring job has already ended"}})
def cancel_scoring_job(model_id: int, session: SessionDep, actor: ActorDep):
    """Queued: cancelled at once. Running: stops after the batch in progress (scores written so far stay)."""
    return _out(session, scoring.cancel_job(session, model_id, actor))


@router.get("/scoring-jobs", response_model=ScoringJobList)
def list_scoring_jobs(session: SessionDep, model_id: int | None = None, status: Status | None = None,
                      limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first."""
    total, items = scoring.list_jobs(session, model_id=model_id, status=status, limit=limit, offset=offset)
    return ScoringJobList(total=total, items=[_out(session, j) for j in items])


@router.get("/instances/{sop_instance_uid}/scores", response_model=InstanceScores,
            responses={404: {"description": "an instance neither indexed nor scored"}})
def get_instance_scores(sop_instance_uid: Annotated[str, Path(pattern=_UID, max_length=64)], session: SessionDep):
    """Every model's score of one instance, newest model first."""
    items = scoring.instance_scores(session, sop_instance_uid)
    return InstanceScores(sop_instance_uid=sop_instance_uid, total=len(items),
                          items=[InstanceScoreOut(**r) for r in items])
