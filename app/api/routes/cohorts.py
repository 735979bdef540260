"""Cohorts: create or preview a frozen snapshot, list, get, manifest (thin: parse -> service -> schema)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel

from app.api.deps import ActorDep, CtxDep, SessionDep, SettingsDep
from app.cohorts import pull_runner, service
from app.cohorts.schemas import CohortDetail, CohortIn, CohortOut, PullIn, PullOut
from app.errors import NotFound
from app.jobs.runner import wake_after_commit
from app.labels.service import get_rules

router = APIRouter(prefix="/cohorts", tags=["cohorts"])
PARQUET = "application/vnd.apache.parquet"


@router.post("", status_code=201, response_model=CohortOut,
             responses={200: {"description": "preview: counts only, nothing saved", "model": CohortOut},
                        422: {"description": "invalid request or unknown taxonomy"}})
def create_cohort(body: CohortIn, response: Response, session: SessionDep, settings: SettingsDep,
                  actor: ActorDep):
    """Build a cohort: one image per patient, patients in two classes excluded, seeded quotas,
    patient-level split. `preview: true` returns the counts (200) without saving. `warnings` names classes
    that got no images, quotas not filled and classes without test images."""
    try:
        out = service.create_cohort(session, body.model_dump(), pseudonym_key=settings.get_pseudonym_key(),
                                    store_dir=settings.store_dir, actor=actor,
                                    rules=get_rules(settings.label_rules))
    except NotFound as exc:
        raise HTTPException(status_code=422, detail=[{"loc": ["body", "taxonomy"], "msg": exc.message,
                                                      "type": "value_error"}]) from exc
    if out["preview"]:
        response.status_code = 200
    return out


@router.post("/pull", status_code=202, response_model=PullOut,
             responses={404: {"description": "unknown node or taxonomy"}, 422: {"description": "invalid request"}})
def start_pull(body: PullIn, ctx: CtxDep, session: SessionDep, actor: ActorDep):
    """Retrieve a taxonomy's candidates from a PACS until each class has `per_class` patients
    (cohort-preview counts) or the PACS has no more; one study-date slice per retrieval.
    A durable background job (one pull at a time per runner; its id is the job's, also shown at
    `GET /api/v1/jobs/{id}`); poll `GET /api/v1/cohorts/pulls/{id}`, cancel with `POST /api/v1/jobs/{id}/cancel`."""
    pull_runner.check_request(ctx, body.node, body.taxonomy, body.study_date)
    out = pull_runner.start_pull(session, body.node, body.taxonomy, body.per_class, body.study_date, actor,
                                 max_rounds=body.max_rounds)
    wake_after_commit(ctx, session)
    return out


@router.get("/pulls/{pull_id}", response_model=PullOut, responses={404: {"description": "unknown pull"}})
def get_pull(pull_id: int, session: SessionDep):
    return pull_runner.get_pull(session, pull_id)


class CohortList(BaseModel):
    total: int
    items: list[CohortOut]


@router.get("", response_model=CohortList)
def list_cohorts(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first."""
    total, items = service.list_cohorts(session, limit=limit, offset=offset)
    return CohortList(total=total, items=items)


@router.delete("/{cohort_id}", status_code=204, response_class=Response,
               responses={404: {"description": "unknown cohort"},
                          409: {"description": "training jobs used it (their ids in the detail)"}})
def delete_cohort(cohort_id: int, session: SessionDep, actor: ActorDep):
    """Delete a cohort no training job used (the snapshot and its member list)."""
    service.delete_cohort(session, cohort_id, actor)
    return Response(status_code=204)


@router.get("/{cohort_id}", response_model=CohortDetail, responses={404: {"description": "unknown cohort"}})
def get_cohort(cohort_id: int, session: SessionDep):
    return service.get_cohort(session, cohort_id)


@router.get("/{cohort_id}/manifest", response_class=Response,
            responses={200: {"content": {"text/csv": {}, PARQUET: {}},
                             "description": "sop_instance_uid, class, split, patient_key"},
                       404: {"description": "unknown cohort"},
                       501: {"description": "format=parquet without pyarrow installed"}})
def manifest(cohort_id: int, session: SessionDep,
             fmt: Literal["csv", "parquet"] = Query(
                 "csv", alias="format",
                 description="csv, or parquet (the `parquet` extra) with the snapshot's identity in its metadata")):
    """sop_instance_uid, class, split, patient_key (HMAC pseudonym; never PatientID/Name)."""
    if fmt == "parquet":
        body, media = service.manifest_parquet(session, cohort_id), PARQUET
    else:
        body, media = service.manifest_csv(session, cohort_id), "text/csv"
    return Response(content=body, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="cohort-{cohort_id}.{fmt}"'})
