"""Build index rows directly (test factory): Patient/Study/Series/Instance through the labeler."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Instance, Patient, Series, Study

_counter = itertools.count(1)

PATIENT_KEYS = ("patient_sex", "patient_birth_date", "patient_name", "patient_species_description",
                "patient_breed_description")
STUDY_KEYS = ("study_date", "study_description", "requested_procedure_description", "patient_age",
              "accession_number")
SERIES_KEYS = ("body_part_examined", "series_description", "protocol_name", "laterality", "series_number",
               "performed_procedure_step_description")
INSTANCE_KEYS = ("sop_class_uid", "view_position", "image_laterality", "photometric_interpretation", "rows",
                 "columns", "bits_stored", "transfer_syntax_uid", "file_path", "file_size", "instance_number",
                 "acquisition_device_processing_description")


def add_index_rows(session: Session, records: Iterable[dict], labeler: Callable[[dict], dict] | None = None
                   ) -> list[Instance]:
    """Insert one instance per record (creating its patient/study/series when new) and label it.

    A record holds index column names plus `patient_id` / `issuer` and optional UIDs; missing UIDs
    are generated (each record then gets its own study and series).
    """
    out = []
    for rec in records:
        n = next(_counter)
        issuer = rec.get("issuer", "")
        patient = session.scalar(select(Patient).where(Patient.patient_id == rec["patient_id"],
                                                       Patient.issuer == issuer))
        if patient is None:
            patient = Patient(patient_id=rec["patient_id"], issuer=issuer,
                              **{k: rec.get(k) for k in PATIENT_KEYS})
            session.add(patient)
            session.flush()
        st_uid = rec.get("study_instance_uid") or f"1.2.826.0.1.3680043.10.999.1.{n}"
        study = session.scalar(select(Study).where(Study.study_instance_uid == st_uid))
        if study is None:
            study = Study(study_instance_uid=st_uid, patient_pk=patient.id, **{k: rec.get(k) for k in STUDY_KEYS})
            session.add(study)
            session.flush()
        se_uid = rec.get("series_instance_uid") or f"1.2.826.0.1.3680043.10.999.2.{n}"
        series = session.scalar(select(Series).where(Series.series_instance_uid == se_uid))
        if series is None:
            series = Series(series_instance_uid=se_uid, study_pk=study.id, modality=rec.get("modality", "CR"),
                            **{k: rec.get(k) for k in SERIES_KEYS})
            session.add(series)
            session.flush()
        inst_fields = {k: rec.get(k) for k in INSTANCE_KEYS}
        inst_fields["patient_sex"] = rec.get("patient_sex")
        inst_fields["photometric_interpretation"] = rec.get("photometric_interpretation", "MONOCHROME2")
        inst_fields["file_path"] = rec.get("file_path") or f"x/{n}.dcm"
        inst_fields["file_size"] = rec.get("file_size") or 0
        inst = Instance(
            sop_instance_uid=rec.get("sop_instance_uid") or f"1.2.826.0.1.3680043.10.999.3.{n}",
            series_pk=series.id, study_pk=study.id, patient_pk=patient.id,
            modality=rec.get("modality", "CR"), **inst_fields,
        )
        if labeler is not None:
            fields = {
                "modality": inst.modality, **{k: getattr(patient, k) for k in PATIENT_KEYS if k != "patient_name"},
                **{k: getattr(study, k) for k in STUDY_KEYS}, **{k: getattr(series, k) for k in SERIES_KEYS},
                **inst_fields,
            }
            for col, value in labeler(fields).items():
                setattr(inst, col, value)
        session.add(inst)
        out.append(inst)
    session.flush()
    return out
