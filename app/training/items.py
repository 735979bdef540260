"""The cohort's members as the worker needs them (the one place to switch to app.cohorts.service)."""

from __future__ import annotations

import importlib.util

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Cohort, CohortMember, Instance


def cohort_items(session: Session, cohort_id: int) -> list[dict]:
    """[{sop_instance_uid, class_name, split, file_path (relative to the store)}], ordered by UID."""
    if importlib.util.find_spec("app.cohorts.service") is not None:
        from app.cohorts import service

        if hasattr(service, "cohort_items"):
            return list(service.cohort_items(session, cohort_id))
    # fallback until the cohort stage lands: the member rows, file path from the index when absent
    q = (
        select(CohortMember.sop_instance_uid, CohortMember.class_name, CohortMember.split,
               CohortMember.file_path, Instance.file_path)
        .outerjoin(Instance, Instance.sop_instance_uid == CohortMember.sop_instance_uid)
        .where(CohortMember.cohort_id == cohort_id)
        .order_by(CohortMember.sop_instance_uid)
    )
    return [
        {"sop_instance_uid": uid, "class_name": cls, "split": split, "file_path": own or indexed}
        for uid, cls, split, own, indexed in session.execute(q)
    ]


def cohort_classes(cohort: Cohort) -> list[str]:
    """Class names in the taxonomy's order (the model's output order)."""
    classes = (cohort.taxonomy or {}).get("classes") or []
    names = [c["name"] if isinstance(c, dict) else str(c) for c in classes]
    if not names:
        summary = (cohort.summary or {}).get("classes") or []
        names = [c["name"] for c in summary if isinstance(c, dict) and "name" in c]
    return names
