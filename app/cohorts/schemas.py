"""Request/response models for taxonomies and cohorts (the API contract's shapes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.worklists.restrict import WorklistRestriction

SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class TaxonomyClass(BaseModel):
    name: str = Field(..., description="class name, e.g. LtK")
    where: dict[str, Any] = Field(
        ..., description="label -> exact value, list of values, or {'min','max'} (age_years, whole years)",
        examples=[{"body_part": "KNEE", "view": "AP", "laterality": "L"}])


class TaxonomyIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "knee-lr", "classes": [
        {"name": "LtK", "where": {"body_part": "KNEE", "laterality": "L"}},
        {"name": "RtK", "where": {"body_part": "KNEE", "laterality": "R"}}]}]})
    name: str
    description: str | None = None
    classes: list[TaxonomyClass] = Field(..., min_length=1, max_length=200)


class TaxonomyOut(BaseModel):
    name: str
    description: str | None = None
    builtin: bool
    classes: list[TaxonomyClass]
    created_at: datetime | None = None


class CohortIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"taxonomy": "xr10", "per_class": 1500, "split": {"train": 0.8, "test": 0.2}, "seed": 0, "preview": False}]})
    taxonomy: str = Field(..., description="a preset (xr10, xr5) or a user taxonomy name")
    per_class: int | None = Field(None, ge=1, le=10_000_000, description="quota per class; all when unset")
    split: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "test": 0.2},
                                    description="patient-level split fractions over train / val / test, sum 1")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    preview: bool = Field(False, description="counts only, nothing saved")
    balanced: bool = Field(False, description="every class gets as many images as the smallest")
    include_conflicts: bool = Field(False, description="admit instances whose label sources disagree")
    match_name_birthdate: bool = Field(False, description="also treat same name + birth date as one patient")
    check_files: bool = Field(True, description="sampled instances must exist in the store")
    worklist: WorklistRestriction | None = Field(None, description="only (or all but) the studies or patients "
                                                 "of an uploaded worklist (docs/exports.md)")

    @field_validator("split")
    @classmethod
    def _split(cls, v: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, f in v.items():
            side = SPLIT_ALIASES.get(k)
            if side is None:
                raise ValueError(f"unknown split side '{k}': use train, val, test")
            if side in out:
                raise ValueError(f"split side '{side}' given twice")
            if not 0 <= f <= 1:
                raise ValueError(f"split fraction for '{k}' must be between 0 and 1")
            out[side] = float(f)
        if not out or abs(sum(out.values()) - 1) > 1e-6:
            raise ValueError("split fractions must sum to 1")
        if not out.get("test"):
            raise ValueError("a split needs a test share above 0 (e.g. {\"train\": 0.8, \"test\": 0.2}): "
                             "without test images a model cannot be evaluated")
        return out


class ClassCount(BaseModel):
    name: str
    available: int = Field(..., description="eligible patients (one image each) before the quota")
    selected: int
    incomplete_label: int = Field(0, description="instances this class would take if a label it needs "
                                  "(view, laterality, sex, age) were known")
    train: int = 0
    val: int = 0
    test: int = 0


class CohortOut(BaseModel):
    id: int | None = Field(None, description="null for a preview")
    taxonomy: str
    preview: bool = False
    ruleset_version: str | None = None
    seed: int
    size: int
    created_at: datetime | None = None
    classes: list[ClassCount]
    excluded: dict[str, int] = Field(..., description="reason -> number of instances")
    params: dict[str, Any] = Field(default_factory=dict, description="the request as given")
    timings: dict[str, float] | None = None
    warnings: list[str] = Field(default_factory=list, description="classes with no images, quotas not filled, "
                                                                  "classes without test images")


class CohortDetail(CohortOut):
    taxonomy_definition: dict[str, Any] | None = Field(None, description="the taxonomy as it was at creation")


class PullIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"node": "pacs", "taxonomy": "xr10", "per_class": 1500, "study_date": "20110101-20161231"}]})
    node: str = Field(..., min_length=1, max_length=64, description="a registered PACS node")
    taxonomy: str = Field(..., description="a preset (xr10, xr5) or a user taxonomy name")
    per_class: int = Field(..., ge=1, le=10_000_000, description="patients wanted per class in the index")
    study_date: str = Field("20110101-20161231", pattern=r"^\d{8}-\d{8}$", description="YYYYMMDD-YYYYMMDD")
    max_rounds: int = Field(200, ge=1, le=10_000, description="at most this many retrievals in all")


class PullClass(BaseModel):
    before: int = Field(..., description="patients the cohort builder selected before the pull")
    after: int
    quota: int
    retrievals: list[int] = Field(..., description="ids of the retrievals started for this class")
    exhausted: bool = Field(..., description="every query was retrieved and the class is still short")
    rounds: list[dict] = Field(default_factory=list, description="per retrieval: {window, retrieval, series, "
                                                                 "status}; series named by explicit UIDs")
    checked: dict = Field(default_factory=dict, description="C-FIND answers checked on our side before any "
                                                            "retrieval: {answers, matched, mismatched, "
                                                            "unverifiable, duplicates, unverifiable_keys: "
                                                            "{key: n}, capped_finds}")
    not_sent: list[str] = Field(default_factory=list, description="matching keys not sent because the node's "
                                                                  "probe found them ignored (checked here only)")


class PullReport(BaseModel):
    node: str
    taxonomy: str
    per_class: int
    retrievals: int
    stopped: str = Field(..., description="done | max_rounds | find_failed | retrieval_failed")
    error: str | None = None
    classes: dict[str, PullClass]


class PullOut(BaseModel):
    id: int
    status: str = Field(..., description="queued | running | completed | partial | failed | cancelled")
    node: str
    taxonomy: str
    per_class: int
    study_date: str
    created_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    report: PullReport | None = None
