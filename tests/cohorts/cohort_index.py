"""Index rows with known traps for the cohort tests (built through the real labeler)."""

from __future__ import annotations

from app.labels.service import make_labeler
from tests.factories.index_rows import add_index_rows


def knee(pid: str, side: str, **kw) -> dict:
    return {"patient_id": pid, "patient_sex": "F", "patient_birth_date": "19700101", "study_date": "20150601",
            "body_part_examined": "KNEE", "view_position": "AP", "image_laterality": side,
            "series_description": "膝関節正面", **kw}


def chest(pid: str, sex: str, age: int, **kw) -> dict:
    return {"patient_id": pid, "patient_sex": sex, "patient_age": f"{age:03d}Y", "study_date": "20150601",
            "body_part_examined": "CHEST", "view_position": "PA", "series_description": "CHEST PA", **kw}


def build_index(session, store_dir, n_per_class: int = 12) -> dict:
    """Clean patients per class plus one of each trap; returns the trap UIDs. Files exist unless noted."""
    recs = []
    for i in range(n_per_class):
        recs.append(knee(f"LK{i}", "L", patient_name=f"LEFT^KNEE{i}"))
        recs.append(knee(f"RK{i}", "R", patient_name=f"RIGHT^KNEE{i}"))
        recs.append(chest(f"CF{i}", "F", 25, patient_name=f"CHEST^F{i}"))
        recs.append(chest(f"CM{i}", "M", 65, patient_name=f"CHEST^M{i}"))
    traps = {
        "dup_a": knee("DUP", "L", sop_instance_uid="1.9.1"),  # same patient, two left knees
        "dup_b": knee("DUP", "L", sop_instance_uid="1.9.2"),
        "two_l": knee("TWO", "L", sop_instance_uid="1.9.3"),  # left and right knee: two classes
        "two_r": knee("TWO", "R", sop_instance_uid="1.9.4"),
        "conflict": knee("CONF", "R", series_description="膝関節（左）", sop_instance_uid="1.9.5"),
        "rgb": knee("RGB", "L", photometric_interpretation="RGB", sop_instance_uid="1.9.6"),
        "no_pixels": knee("SR", "L", photometric_interpretation=None, sop_instance_uid="1.9.7"),
        "no_label": {"patient_id": "NOL", "series_description": "XR", "sop_instance_uid": "1.9.8"},
        "missing": knee("MISS", "R", sop_instance_uid="1.9.9", file_path="gone/1.9.9.dcm"),
        # another ID of the same person (changed ID): same name + birth date as LK0
        "alias": knee("LK0-NEW", "R", patient_name="left^knee0", sop_instance_uid="1.9.10"),
    }
    rows = add_index_rows(session, recs + list(traps.values()), make_labeler(session))
    for r in rows:
        if r.sop_instance_uid != "1.9.9":
            f = store_dir / r.file_path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"DICM")
    session.commit()
    return {k: v["sop_instance_uid"] for k, v in traps.items()}

