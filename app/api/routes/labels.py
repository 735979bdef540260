"""Labels: coverage of the site's headers by the rules, the vocabulary with its codes, overlay checks."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, HTTPException, Query
from pydantic import BaseModel, Field

from app.api.deps import SessionDep, SettingsDep
from app.labels.coverage import COVERAGE_LABELS, coverage
from app.labels.overlay import overlay_summary, validate_overlay
from app.labels.service import get_rules

router = APIRouter(prefix="/labels", tags=["labels"])


class CoverageValue(BaseModel):
    source: str = Field(description="DICOM keyword the value was read from")
    value: str
    count: int = Field(description="instances without the label that carry this value")
    examples: list[str] = Field(description="SOP Instance UIDs of a few of them")


class CoverageLabel(BaseModel):
    missing: int = Field(description="instances without this label (laterality: UNKNOWN)")
    values: list[CoverageValue]


class CoverageOut(BaseModel):
    ruleset_version: str
    instances: int
    labels: dict[str, CoverageLabel]


@router.get("/coverage", response_model=CoverageOut,
            summary="Header values and descriptions that produced no body part, view or laterality")
def get_coverage(
    session: SessionDep, settings: SettingsDep,
    label: Annotated[list[Literal["body_part", "view", "laterality"]] | None, Query(
        description="labels to report (default: all three)")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="values per label, most frequent first")] = 20,
    examples: Annotated[int, Query(ge=0, le=20, description="example instance UIDs per value")] = 3,
) -> CoverageOut:
    """The most frequent tag values and description strings among the indexed instances the rules
    left without a label, with counts and example instance UIDs: the terms a site's own PACS uses that
    the rules miss (add them in a rules overlay, then relabel)."""
    labels = tuple(dict.fromkeys(label)) if label else COVERAGE_LABELS
    out = coverage(session, labels, limit=limit, examples=examples)
    return CoverageOut(ruleset_version=get_rules(settings.label_rules).version, **out)


@router.get("/vocabulary", summary="Label values with their DICOM PS3.16 codes")
def get_vocabulary(settings: SettingsDep) -> dict:
    """Each label's values in the rules in force; body part, view and laterality values with the
    SNOMED CT code and meaning of their PS3.16 concept."""
    rules = get_rules(settings.label_rules)
    out: dict = {"ruleset_version": rules.version, "labels": {}}
    for label, values in rules.vocabulary.items():
        out["labels"][label] = [{"value": v, "code": rules.code(label, v), "meaning": rules.code_meaning(label, v)}
                                for v in values]
    return out


@router.post("/overlays/validate", summary="Check a site rules overlay (YAML)",
             responses={422: {"description": "invalid overlay: each error with its line, column and path"}})
def validate(body: Annotated[str, Body(media_type="application/yaml", max_length=1_000_000,
                                       description="the overlay file's text")]) -> dict:
    """Validate an overlay (`extends: builtin`) without applying it; 422 lists every error with
    the line it is on."""
    data, errors = validate_overlay(body)
    if errors:
        raise HTTPException(status_code=422, detail=[
            {"loc": ["body", *(e["path"].split("."))], "line": e["line"], "column": e["column"], "msg": e["message"],
             "type": "overlay"} for e in errors])
    return {"valid": True, "adds": overlay_summary(data or {})}
