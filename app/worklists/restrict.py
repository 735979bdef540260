"""Cohorts restricted by a worklist (issue #17 item 2): "only these patients/studies" or "exclude these".

The worklist's valid keys are matched against the local index (the cohort is built from it), in SQL
(no list of keys travels through Python, so a 50,000-row worklist costs one semi-join):
StudyInstanceUID and AccessionNumber keys name studies, PatientID keys name patients. `by: patient`
widens a study worklist to every indexed study of the patients it names (e.g. exclude everyone who
opted out, whatever study of theirs was listed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, exists, not_, or_, select

from app.db.models import Patient, Study, Worklist, WorklistRow


class WorklistRestriction(BaseModel):
    """`worklist` in a cohort request."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1, le=2**31 - 1, description="an uploaded worklist (POST /api/v1/worklists)")
    mode: Literal["include", "exclude"] = Field("include", description="only these, or all but these")
    by: Literal["study", "patient"] = Field(
        "study", description="study: the listed studies; patient: every study of the listed patients "
                             "(always so for a PatientID worklist)")


def worklist_condition(t, spec):
    """A condition on the instances table `t` for `spec.worklist` ({"id", "mode", "by"}), or None."""
    w = getattr(spec, "worklist", None)
    if not w:
        return None
    if isinstance(w, BaseModel):
        w = w.model_dump()
    wid, mode, by = int(w["id"]), w.get("mode", "include"), w.get("by", "study")
    r = WorklistRow.__table__
    keys = select(r.c.key).where(r.c.worklist_id == wid, r.c.status != "invalid", r.c.key.is_not(None))

    def key_type(name: str):
        return exists(select(Worklist.id).where(Worklist.id == wid, Worklist.key_type == name))

    s, p = Study.__table__, Patient.__table__
    by_uid = select(s.c.id).where(s.c.study_instance_uid.in_(keys))
    by_acc = select(s.c.id).where(s.c.accession_number.in_(keys))
    patients = select(p.c.id).where(p.c.patient_id.in_(keys))
    if by == "patient":
        studies_cond = or_(
            and_(key_type("StudyInstanceUID"), t.c.patient_pk.in_(select(s.c.patient_pk).where(s.c.id.in_(by_uid)))),
            and_(key_type("AccessionNumber"), t.c.patient_pk.in_(select(s.c.patient_pk).where(s.c.id.in_(by_acc)))))
    else:
        studies_cond = or_(and_(key_type("StudyInstanceUID"), t.c.study_pk.in_(by_uid)),
                           and_(key_type("AccessionNumber"), t.c.study_pk.in_(by_acc)))
    listed = or_(studies_cond, and_(key_type("PatientID"), t.c.patient_pk.in_(patients)))
    return listed if mode == "include" else not_(listed)
