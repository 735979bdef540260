"""Taxonomies: presets (xr10, xr5) and user-defined ones (thin: parse -> service -> schema)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Response
from pydantic import BaseModel

from app.api.deps import ActorDep, SessionDep, SettingsDep
from app.audit import record
from app.cohorts import taxonomies
from app.cohorts.schemas import TaxonomyIn, TaxonomyOut
from app.labels.service import get_rules

router = APIRouter(prefix="/taxonomies", tags=["taxonomies"])


class TaxonomyList(BaseModel):
    total: int
    items: list[TaxonomyOut]


@router.get("", response_model=TaxonomyList)
def list_taxonomies(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """The presets first, then user taxonomies by name."""
    rows = taxonomies.list_taxonomies(session)
    return TaxonomyList(total=len(rows), items=rows[offset:offset + limit])


@router.delete("/{name}", status_code=204, response_class=Response,
               responses={404: {"description": "unknown taxonomy"},
                          409: {"description": "a preset, or cohorts were built from it (their ids in the detail)"}})
def delete_taxonomy(name: str, session: SessionDep, actor: ActorDep):
    """Delete a user taxonomy no cohort was built from; presets cannot be deleted."""
    taxonomies.delete_taxonomy(session, name)
    record(session, actor, "taxonomy.delete", target=f"taxonomy:{name}")
    return Response(status_code=204)


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
