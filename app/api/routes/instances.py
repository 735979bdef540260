"""Index browse: instances with filters and pagination, one instance, stats. No patient names or IDs."""

from __future__ import annotations

import inspect
import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from app.api.deps import SessionDep
from app.errors import InvalidInput
from app.index import query
from app.index.query import InstanceFilter

router = APIRouter(tags=["index"])

_DATE = r"^\d{8}$"
_UID = r"^[0-9]+(\.[0-9]+)*$"


class Labels(BaseModel):
    body_part: str | None = None
    view: str | None = None
    laterality: str | None = None
    sex: str | None = None
    age_years: float | None = None
    age_band: str | None = None
    species: str | None = Field(None, description="set only when the header names a non-human patient "
                                                  "(such an instance gets no human body part)")
    sources: dict = Field(default_factory=dict, description="label -> the tag or rule it came from")
    conflicts: list = Field(default_factory=list, description="labels whose sources disagree")
    has_conflict: bool = False
    ruleset_version: str | None = None


class InstanceItem(BaseModel):
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str | None
    modality: str | None
    body_part_examined: str | None
    view_position: str | None
    laterality: str | None = Field(description="ImageLaterality, else the series' Laterality")
    image_laterality: str | None
    series_laterality: str | None
    patient_sex: str | None
    patient_age_years: float | None
    study_date: str | None
    study_description: str | None
    series_description: str | None
    protocol_name: str | None
    instance_number: int | None
    photometric_interpretation: str | None
    rows: int | None
    columns: int | None
    bits_stored: int | None
    transfer_syntax_uid: str | None
    file_size: int
    source_node: str | None
    received_at: datetime | None
    labels: Labels


class InstancePage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[InstanceItem]


class Stats(BaseModel):
    patients: int
    studies: int
    series: int
    instances: int
    with_conflicts: int
    labels: dict[str, dict[str, int]] = Field(description="label -> value -> instances ('unlabeled' for none)")
    modalities: dict[str, int]


def _filters(
    modality: Annotated[str | None, Query(max_length=16)] = None,
    body_part_examined: Annotated[str | None, Query(max_length=64)] = None,
    view_position: Annotated[str | None, Query(max_length=16)] = None,
    laterality: Annotated[str | None, Query(max_length=16, description="ImageLaterality or Laterality")] = None,
    patient_sex: Annotated[str | None, Query(max_length=16)] = None,
    study_date: Annotated[str | None, Query(description="YYYYMMDD or a DICOM range YYYYMMDD-YYYYMMDD "
                                                        "(either side may be empty)")] = None,
    study_date_from: Annotated[str | None, Query(pattern=_DATE)] = None,
    study_date_to: Annotated[str | None, Query(pattern=_DATE)] = None,
    sop_instance_uid: Annotated[str | None, Query(pattern=_UID, max_length=64)] = None,
    study_instance_uid: Annotated[str | None, Query(pattern=_UID, max_length=64)] = None,
    series_instance_uid: Annotated[str | None, Query(pattern=_UID, max_length=64)] = None,
    source_node: Annotated[str | None, Query(max_length=64)] = None,
    label_body_part: Annotated[str | None, Query(max_length=32)] = None,
    label_view: Annotated[str | None, Query(max_length=32)] = None,
    label_laterality: Annotated[str | None, Query(max_length=16)] = None,
    label_sex: Annotated[str | None, Query(max_length=8)] = None,
    label_age_band: Annotated[str | None, Query(max_length=16)] = None,
    age_min: Annotated[float | None, Query(ge=0, le=150, description="label age_years >=")] = None,
    age_max: Annotated[float | None, Query(ge=0, le=150, description="label age_years <=")] = None,
    has_conflict: bool | None = None,
) -> InstanceFilter:
    if study_date:
        m = re.fullmatch(r"(\d{8})?(-)?(\d{8})?", study_date)
        if not m or not (m.group(1) or m.group(3)) or (m.group(3) and not m.group(2)):
            raise InvalidInput("study_date: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
        study_date_from = max(filter(None, [study_date_from, m.group(1)]), default=None)
        to = m.group(3) if m.group(2) else m.group(1)
        study_date_to = min(filter(None, [study_date_to, to]), default=None)
    return InstanceFilter(
        modality=modality, body_part_examined=body_part_examined, view_position=view_position,
        laterality=laterality, patient_sex=patient_sex, study_date_from=study_date_from,
        study_date_to=study_date_to, sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid, source_node=source_node, label_body_part=label_body_part,
        label_view=label_view, label_laterality=label_laterality, label_sex=label_sex,
        label_age_band=label_age_band, age_min=age_min, age_max=age_max, has_conflict=has_conflict,
    )


ACCEPTED = tuple(inspect.signature(_filters).parameters) + ("limit", "offset")


def _known_parameters(request: Request) -> None:
    """An unknown filter must not silently return everything (`?body_part=KNEE` meant label_body_part)."""
    unknown = sorted(set(request.query_params) - set(ACCEPTED))
    if unknown:
        raise HTTPException(status_code=422, detail=[
            {"loc": ["query", name], "type": "unknown_parameter",
             "msg": f"unknown query parameter {name!r}"
                    + (f" (a label filter is label_{name})" if f"label_{name}" in ACCEPTED else "")
                    + f"; accepted: {', '.join(ACCEPTED)}",
             "ctx": {"accepted": list(ACCEPTED)}} for name in unknown])


@router.get("/instances", response_model=InstancePage, summary="Browse indexed instances",
            dependencies=[Depends(_known_parameters)],
            responses={422: {"description": "a bad value, or an unknown query parameter (the accepted ones in "
                                            "the detail)"}})
def list_instances(
    session: SessionDep,
    f: Annotated[InstanceFilter, Depends(_filters)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> InstancePage:
    total, items = query.list_instances(session, f, limit=limit, offset=offset)
    return InstancePage(total=total, limit=limit, offset=offset, items=items)


@router.get("/instances/{sop_instance_uid}", response_model=InstanceItem, summary="One indexed instance")
def get_instance(session: SessionDep,
                 sop_instance_uid: Annotated[str, Path(pattern=_UID, max_length=64)]) -> InstanceItem:
    return InstanceItem(**query.get_instance(session, sop_instance_uid))


@router.get("/stats", response_model=Stats, summary="Index counts and instances per label value")
def stats(session: SessionDep) -> Stats:
    return Stats(**query.stats(session))
