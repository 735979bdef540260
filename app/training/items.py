"""The cohort's members and classes as the worker needs them."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.cohorts.service import training_items
from app.db.models import Cohort


def cohort_items(session: Session, cohort_id: int) -> list[dict]:
    """[{sop_instance_uid, class_name, split, file_path (relative to the store), patient_key}] of a frozen
    cohort (patient_key groups a patient's images for the validation hold-out; it never reaches spec.json)."""
    return training_items(session, cohort_id)


def cohort_classes(cohort: Cohort) -> list[str]:
    """Class names in the taxonomy's order (the model's output order)."""
    classes = (cohort.taxonomy or {}).get("classes") or []
    names = [c["name"] if isinstance(c, dict) else str(c) for c in classes]
    if not names:
        summary = (cohort.summary or {}).get("classes") or []
        names = [c["name"] for c in summary if isinstance(c, dict) and "name" in c]
    return names
