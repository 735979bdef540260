"""Read side of the index: filtered instance listing and counts (never patient names or IDs)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from app.db.models import Instance, Patient, Series, Study
from app.errors import NotFound
from app.index.extract import age_years

LABELS = ("body_part", "view", "laterality", "sex", "age_band")


@dataclass
class InstanceFilter:
    modality: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None
    laterality: str | None = None  # image laterality or series laterality
    patient_sex: str | None = None
    study_date_from: str | None = None  # YYYYMMDD, inclusive
    study_date_to: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    source_node: str | None = None
    label_body_part: str | None = None
    label_view: str | None = None
    label_laterality: str | None = None
    label_sex: str | None = None
    label_age_band: str | None = None
    age_min: float | None = None  # label_age_years, inclusive
    age_max: float | None = None
    has_conflict: bool | None = None


# the columns an item is built from: no patient_name, no patient_id
_COLUMNS = (
    Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid, Instance.modality, Instance.view_position,
    Instance.image_laterality, Instance.photometric_interpretation, Instance.rows, Instance.columns,
    Instance.bits_stored, Instance.transfer_syntax_uid, Instance.file_size, Instance.source_node,
    Instance.received_at, Instance.instance_number,
    Instance.label_body_part, Instance.label_view, Instance.label_laterality, Instance.label_sex,
    Instance.label_age_years, Instance.label_age_band, Instance.label_species, Instance.label_sources,
    Instance.label_conflicts, Instance.has_conflict, Instance.ruleset_version,
    Series.series_instance_uid, Series.body_part_examined, Series.laterality, Series.series_description,
    Series.protocol_name,
    Study.study_instance_uid, Study.study_date, Study.study_description, Study.patient_age,
    Instance.patient_sex, Patient.patient_birth_date,
)


def _joined(stmt: Select) -> Select:
    return (stmt.select_from(Instance)
            .join(Series, Instance.series_pk == Series.id)
            .join(Study, Instance.study_pk == Study.id)
            .join(Patient, Instance.patient_pk == Patient.id))


def _where(stmt: Select, f: InstanceFilter) -> Select:
    eq = {
        "modality": Instance.modality, "body_part_examined": Series.body_part_examined,
        "view_position": Instance.view_position, "patient_sex": Instance.patient_sex,
        "sop_instance_uid": Instance.sop_instance_uid, "study_instance_uid": Study.study_instance_uid,
        "series_instance_uid": Series.series_instance_uid, "source_node": Instance.source_node,
        "label_body_part": Instance.label_body_part, "label_view": Instance.label_view,
        "label_laterality": Instance.label_laterality, "label_sex": Instance.label_sex,
        "label_age_band": Instance.label_age_band, "has_conflict": Instance.has_conflict,
    }
    for name, col in eq.items():
        v = getattr(f, name)
        if v is not None:
            stmt = stmt.where(col == v)
    if f.laterality is not None:
        stmt = stmt.where(or_(Instance.image_laterality == f.laterality, Series.laterality == f.laterality))
    if f.study_date_from:
        stmt = stmt.where(Study.study_date >= f.study_date_from)
    if f.study_date_to:
        stmt = stmt.where(Study.study_date <= f.study_date_to)
    if f.age_min is not None:
        stmt = stmt.where(Instance.label_age_years >= f.age_min)
    if f.age_max is not None:
        stmt = stmt.where(Instance.label_age_years <= f.age_max)
    return stmt


def _item(r) -> dict:
    m = r._mapping
    age = age_years(m["patient_age"], m["patient_birth_date"], m["study_date"])
    if age is None:
        age = m["label_age_years"]
    return {
        "sop_instance_uid": m["sop_instance_uid"],
        "study_instance_uid": m["study_instance_uid"],
        "series_instance_uid": m["series_instance_uid"],
        "sop_class_uid": m["sop_class_uid"],
        "modality": m["modality"],
        "body_part_examined": m["body_part_examined"],
        "view_position": m["view_position"],
        "laterality": m["image_laterality"] or m["laterality"],
        "image_laterality": m["image_laterality"],
        "series_laterality": m["laterality"],
        "patient_sex": m["patient_sex"],
        "patient_age_years": age,
        "study_date": m["study_date"],
        "study_description": m["study_description"],
        "series_description": m["series_description"],
        "protocol_name": m["protocol_name"],
        "instance_number": m["instance_number"],
        "photometric_interpretation": m["photometric_interpretation"],
        "rows": m["rows"],
        "columns": m["columns"],
        "bits_stored": m["bits_stored"],
        "transfer_syntax_uid": m["transfer_syntax_uid"],
        "file_size": m["file_size"],
        "source_node": m["source_node"],
        "received_at": m["received_at"],
        "labels": {
            "body_part": m["label_body_part"],
            "view": m["label_view"],
            "laterality": m["label_laterality"],
            "sex": m["label_sex"],
            "age_years": m["label_age_years"],
            "age_band": m["label_age_band"],
            "species": m["label_species"],
            "sources": m["label_sources"] or {},
            "conflicts": m["label_conflicts"] or [],
            "has_conflict": bool(m["has_conflict"]),
            "ruleset_version": m["ruleset_version"],
        },
    }


def list_instances(session: Session, f: InstanceFilter, limit: int = 100, offset: int = 0) -> tuple[int, list[dict]]:
    """(total matching, one page of items ordered by arrival)."""
    total = session.scalar(_where(_joined(select(func.count(Instance.id))), f)) or 0
    rows = session.execute(_where(_joined(select(*_COLUMNS)), f).order_by(Instance.id).limit(limit).offset(offset))
    return total, [_item(r) for r in rows]


def get_instance(session: Session, sop_instance_uid: str) -> dict:
    r = session.execute(_joined(select(*_COLUMNS)).where(Instance.sop_instance_uid == sop_instance_uid)).first()
    if r is None:
        raise NotFound(f"instance {sop_instance_uid} not found")
    return _item(r)


def stats(session: Session) -> dict:
    """Counts of patients, studies, series, instances; instances per label value and per modality."""
    out: dict = {
        "patients": session.scalar(select(func.count(Patient.id))) or 0,
        "studies": session.scalar(select(func.count(Study.id))) or 0,
        "series": session.scalar(select(func.count(Series.id))) or 0,
        "instances": session.scalar(select(func.count(Instance.id))) or 0,
        "with_conflicts": session.scalar(select(func.count(Instance.id)).where(Instance.has_conflict.is_(True))) or 0,
    }
    per: dict[str, dict[str, int]] = {}
    for label in LABELS:
        col = getattr(Instance, f"label_{label}")
        per[label] = {("unlabeled" if v is None else str(v)): n
                      for v, n in session.execute(select(col, func.count(Instance.id)).group_by(col))}
    out["labels"] = per
    out["modalities"] = {("unknown" if v is None else v): n for v, n in session.execute(
        select(Instance.modality, func.count(Instance.id)).group_by(Instance.modality))}
    return out


FILTER_FIELDS = tuple(fl.name for fl in fields(InstanceFilter))
