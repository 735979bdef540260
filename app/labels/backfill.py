"""Fill the label-source columns added by migration 0003 from the stored files' headers.

Used by the migration (so an upgraded index is complete before the next relabel) and by
`radcohort labels backfill`. Reads headers only (pydicom, `specific_tags`), writes with one
executemany per batch; a file that is missing or unreadable is counted and skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

log = logging.getLogger("radcohort.labels")

_TAGS = ["SpecificCharacterSet", "PerformedProcedureStepDescription", "AcquisitionDeviceProcessingDescription",
         "PatientSpeciesDescription", "PatientBreedDescription", "RequestedProcedureDescription",
         "RequestAttributesSequence"]


def _header(path: Path) -> dict:
    import pydicom

    from app.index.extract import _request_attribute, _text

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    return {
        "pps": _text(ds, "PerformedProcedureStepDescription"),
        "adpd": _text(ds, "AcquisitionDeviceProcessingDescription"),
        "species": _text(ds, "PatientSpeciesDescription"),
        "breed": _text(ds, "PatientBreedDescription"),
        "rpd": _text(ds, "RequestedProcedureDescription") or _request_attribute(ds, "RequestedProcedureDescription"),
    }


def backfill_label_sources(conn: sa.engine.Connection, store_dir: Path | None, batch: int = 1000) -> dict:
    """Read each indexed file once and fill the new columns where they are empty.

    Returns {"files", "filled", "missing"}. Paths are relative to `store_dir` (or absolute, for
    files indexed in place); without a store nothing is read.
    """
    stats = {"files": 0, "filled": 0, "missing": 0}
    if store_dir is None or not Path(store_dir).is_dir():
        return stats
    store = Path(store_dir)
    last = 0
    q = sa.text("SELECT i.id, i.file_path, i.series_pk, i.study_pk, i.patient_pk FROM instances i "
                "WHERE i.id > :last ORDER BY i.id LIMIT :n")
    seen_series: set[int] = set()
    seen_patients: set[int] = set()
    seen_studies: set[int] = set()
    while True:
        rows = conn.execute(q, {"last": last, "n": batch}).fetchall()
        if not rows:
            break
        inst, series, patients, studies = [], [], [], []
        for iid, rel, series_pk, study_pk, patient_pk in rows:
            stats["files"] += 1
            p = Path(rel) if Path(rel).is_absolute() else store / rel
            try:
                h = _header(p)
            except Exception:  # noqa: BLE001 - gone or not DICOM: leave the row as it is
                stats["missing"] += 1
                continue
            if h["adpd"]:
                inst.append({"v": h["adpd"][:255], "id": iid})
            if h["pps"] and series_pk not in seen_series:
                seen_series.add(series_pk)
                series.append({"v": h["pps"][:255], "id": series_pk})
            if (h["species"] or h["breed"]) and patient_pk not in seen_patients:
                seen_patients.add(patient_pk)
                patients.append({"s": (h["species"] or None) and h["species"][:64],
                                 "b": (h["breed"] or None) and h["breed"][:64], "id": patient_pk})
            if h["rpd"] and study_pk not in seen_studies:
                seen_studies.add(study_pk)
                studies.append({"v": h["rpd"][:255], "id": study_pk})
            stats["filled"] += bool(h["adpd"] or h["pps"] or h["species"] or h["breed"] or h["rpd"])
        for sql, params in (
            ("UPDATE instances SET acquisition_device_processing_description = :v "
             "WHERE id = :id AND acquisition_device_processing_description IS NULL", inst),
            ("UPDATE series SET performed_procedure_step_description = :v "
             "WHERE id = :id AND performed_procedure_step_description IS NULL", series),
            ("UPDATE patients SET patient_species_description = COALESCE(patient_species_description, :s), "
             "patient_breed_description = COALESCE(patient_breed_description, :b) WHERE id = :id", patients),
            ("UPDATE studies SET requested_procedure_description = :v "
             "WHERE id = :id AND requested_procedure_description IS NULL", studies),
        ):
            if params:
                conn.execute(sa.text(sql), params)
        last = rows[-1][0]
    log.info("label-source backfill: %d files, %d with new values, %d unreadable", stats["files"], stats["filled"],
             stats["missing"])
    return stats
