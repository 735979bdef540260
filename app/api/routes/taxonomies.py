"""Taxonomies: presets (xr10, xr5) and user-defined ones (thin: parse -> service -> schema)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from app.api.deps import ActorDep, SessionDep, SettingsDep
from app.audit import record
from app.cohorts import taxonomies
from app.cohorts.schemas import TaxonomyIn, TaxonomyOut
from app.labels.service import get_rules

router = APIRouter(prefix="/taxonomies", tags=["taxonomies"])


@router.get("", response_model=list[TaxonomyOut])
def list_taxonomies(session: SessionDep):
    """The presets first, then user taxonomies by name."""
    return taxonomies.list_taxonomies(session)


@router.get("/{name}", response_model=TaxonomyOut, responses={404: {"description": "unknown taxonomy"}})
def get_taxonomy(name: str, session: SessionDep):
    return taxonomies.get_taxonomy(session, name)


@router.post("", status_code=201, response_model=TaxonomyOut,
             responses={409: {"description": "the name is taken"},
                        422: {"description": "unknown label name or value (field-level detail)"}})
def create_taxonomy(body: TaxonomyIn, session: SessionDep, settings: SettingsDep, actor: ActorDep):
    """A user taxonomy: named classes, each a conjunction of label predicates."""
    try:
        out = taxonomies.create_taxonomy(session, body.model_dump(), get_rules(settings.label_rules))
    except taxonomies.TaxonomyInvalid as exc:
        raise HTTPException(status_code=422, detail=exc.errors) from exc
    record(session, actor, "taxonomy.create", target=f"taxonomy:{out['name']}", classes=len(out["classes"]))
    return out
