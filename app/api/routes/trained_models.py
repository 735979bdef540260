"""Trained models: list with their cards, one model, and predictions on an uploaded DICOM."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field

from app import audit
from app.api.deps import ActorDep, CtxDep, SessionDep
from app.labels.service import get_rules
from app.training import predict

router = APIRouter(tags=["models"])


class ModelOut(BaseModel):
    id: int
    job_id: int
    architecture: str
    classes: list[str]
    card: dict
    created_at: datetime | None


class ModelList(BaseModel):
    total: int
    items: list[ModelOut]


class Prediction(BaseModel):
    class_: str = Field(..., alias="class", serialization_alias="class")
    confidence: float = Field(..., description="softmax probability of the predicted class (0..1)")
    probabilities: dict[str, float] = Field(..., description="every class; they sum to 1")
    in_domain: bool | None = Field(None, description="false when the image is not a radiograph (CR, DX, DR) or "
                                                     "shows a body part the model has no class for; null when "
                                                     "its header could not be read")
    warning: str | None = Field(None, description="why the image is outside the model's domain")
    domain: dict = Field(default_factory=dict, description="the upload's modality and body-part label")


@router.get("/models", response_model=ModelList)
def list_models(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Newest first."""
    total, rows = predict.list_models(session, limit=limit, offset=offset)
    return ModelList(total=total, items=[ModelOut(**predict.model_view(m)) for m in rows])


@router.get("/models/{model_id}", response_model=ModelOut)
def get_model(model_id: int, session: SessionDep):
    return ModelOut(**predict.model_view(predict.get_model(session, model_id)))


@router.delete("/models/{model_id}", status_code=204, response_class=Response,
               responses={404: {"description": "unknown model"}})
def delete_model(model_id: int, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Delete a model, its checkpoint, its scores and scoring jobs, and its loaded predictor process; its
    training job keeps its metrics and report."""
    predict.delete_model(session, ctx.settings, model_id)
    audit.record(session, actor, "model.delete", f"model:{model_id}")
    loaded = ctx.existing(predict.PredictorPool)
    if loaded is not None:  # its warm predictor process goes too
        loaded.discard(model_id)
    return Response(status_code=204)


@router.post("/models/{model_id}/predict", response_model=Prediction, response_model_by_alias=True,
             responses={413: {"description": "upload over the size limit"},
                        415: {"description": "not a DICOM file"}, 422: {"description": "malformed DICOM"},
                        502: {"description": "the model could not be loaded, or its predictor process died "
                                            "twice on this image"},
                        503: {"description": "torch (the [worker] extra) is not installed on the API machine"},
                        504: {"description": "no answer within RADCOHORT_PREDICT_TIMEOUT_S"}})
def predict_upload(model_id: int, request: Request, session: SessionDep, ctx: CtxDep, actor: ActorDep,
                   file: UploadFile = File(..., description="one DICOM Part 10 file")):
    """Classify one uploaded DICOM image. The model is held loaded by a predictor process of the API (one per
    model, started by the first request, kept for RADCOHORT_PREDICT_IDLE_S; the API process never loads
    torch). An image outside the model's domain (not CR/DX/DR, or a body part none of its classes covers) is
    still classified but answered with `in_domain: false` and a `warning`, so a caller can tell a guess from a
    prediction."""
    model = predict.get_model(session, model_id)
    settings = ctx.settings
    limit = predict.max_upload_bytes(settings)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise predict.PayloadTooLarge(f"upload larger than the limit of {limit} bytes")
    with predict.spooled_upload(file.file, settings.data_dir / "tmp", limit) as path:
        result = predict.pool(ctx).predict(model_id, (settings.data_dir / model.path).parent, path,
                                           timeout=predict.timeout_seconds(settings))
        result.update(predict.domain_check(session, model, path, get_rules(settings.label_rules)))
    audit.record(session, actor, "model.predict", f"model:{model_id}", predicted=result["class"],
                 in_domain=result["in_domain"])
    return Prediction.model_validate(result)
