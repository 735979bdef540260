"""Coverage report: what a site's headers say where the rules found no body part, view or side.

For each label, the instances left without it, and the most frequent header values and description
strings among them (one GROUP BY per source column), with counts and example instance UIDs, so a
site can see which of its own terms to add in a rules overlay.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.db.models import Instance, Series, Study

COVERAGE_LABELS = ("body_part", "view", "laterality")

_I, _SE, _ST = Instance.__table__.c, Series.__table__.c, Study.__table__.c
# (DICOM keyword, column) the rules read, per label
_SOURCES = {
    "body_part": [("BodyPartExamined", _SE.body_part_examined)],
    "view": [("ViewPosition", _I.view_position)],
    "laterality": [("ImageLaterality", _I.image_laterality), ("Laterality", _SE.laterality)],
}
_TEXTS = [("SeriesDescription", _SE.series_description), ("ProtocolName", _SE.protocol_name),
          ("StudyDescription", _ST.study_description),
          ("PerformedProcedureStepDescription", _SE.performed_procedure_step_description),
          ("RequestedProcedureDescription", _ST.requested_procedure_description),
          ("AcquisitionDeviceProcessingDescription", _I.acquisition_device_processing_description)]


def _missing(label: str):
    if label == "body_part":
        # an animal has no human body part on purpose: not a gap in the rules
        return and_(_I.label_body_part.is_(None), or_(_I.label_species.is_(None), _I.label_species == "HUMAN"))
    if label == "view":
        return _I.label_view.is_(None)
    return or_(_I.label_laterality.is_(None), _I.label_laterality == "UNKNOWN")


def _joined(*cols):
    return select(*cols).select_from(Instance.__table__.join(Series.__table__, _I.series_pk == _SE.id)
                                     .join(Study.__table__, _I.study_pk == _ST.id))


def coverage(session: Session, labels: tuple[str, ...] = COVERAGE_LABELS, limit: int = 20,
             examples: int = 3) -> dict:
    """{"instances", "labels": {label: {"missing", "values": [{"source", "value", "count", "examples"}]}}}."""
    total = session.scalar(select(func.count()).select_from(Instance.__table__)) or 0
    out: dict = {"instances": total, "labels": {}}
    for label in labels:
        cond = _missing(label)
        missing = session.scalar(select(func.count()).select_from(Instance.__table__).where(cond)) or 0
        groups = []
        for keyword, col in _SOURCES[label] + _TEXTS:
            n = func.count().label("n")
            q = (_joined(col.label("value"), n).where(cond, col.is_not(None), col != "")
                 .group_by(col).order_by(n.desc(), col).limit(limit))
            groups += [(cnt, keyword, col, value) for value, cnt in session.execute(q)]
        groups.sort(key=lambda g: (-g[0], g[1], g[3]))
        values = []
        for cnt, keyword, col, value in groups[:limit]:
            uids = session.scalars(_joined(_I.sop_instance_uid).where(cond, col == value)
                                   .order_by(_I.id).limit(examples)).all()
            values.append({"source": keyword, "value": value, "count": cnt, "examples": list(uids)})
        out["labels"][label] = {"missing": missing, "values": values}
    return out
