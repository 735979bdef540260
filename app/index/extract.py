"""Pure header -> record extraction (no DB, no I/O).

A record is one flat dict per instance holding every column of the Patient, Study, Series and
Instance tables (keys named as the columns), plus a few extra header fields the labeler reads
(`image_comments`, `derivation_description`, `patient_orientation`). RequestedProcedureDescription is
read from the top level or, where images carry it, from the first RequestAttributesSequence item. Text is decoded with the dataset's Specific Character Set
(pydicom does it on access), so Japanese ISO_IR 192 / ISO 2022 IR 87 values read back as Unicode.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

# record key -> DICOM keyword, text values
_TEXT = {
    "patient_id": "PatientID",
    "issuer": "IssuerOfPatientID",
    "patient_name": "PatientName",
    "patient_sex": "PatientSex",
    "patient_birth_date": "PatientBirthDate",
    "study_instance_uid": "StudyInstanceUID",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_description": "StudyDescription",
    "requested_procedure_description": "RequestedProcedureDescription",
    "patient_age": "PatientAge",
    "series_instance_uid": "SeriesInstanceUID",
    "modality": "Modality",
    "body_part_examined": "BodyPartExamined",
    "series_description": "SeriesDescription",
    "protocol_name": "ProtocolName",
    "laterality": "Laterality",
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "view_position": "ViewPosition",
    "image_laterality": "ImageLaterality",
    "photometric_interpretation": "PhotometricInterpretation",
    "performed_procedure_step_description": "PerformedProcedureStepDescription",
    "acquisition_device_processing_description": "AcquisitionDeviceProcessingDescription",
    "patient_species_description": "PatientSpeciesDescription",
    "patient_breed_description": "PatientBreedDescription",
    # extras for the labeler (not columns)
    "image_comments": "ImageComments",
    "derivation_description": "DerivationDescription",
    "patient_orientation": "PatientOrientation",
}
_INT = {
    "series_number": "SeriesNumber",
    "instance_number": "InstanceNumber",
    "rows": "Rows",
    "columns": "Columns",
    "bits_stored": "BitsStored",
}
_UIDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid")


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        elem = ds.data_element(keyword)
    except (KeyError, ValueError):
        return None
    if elem is None:
        return None
    try:
        value = elem.value
    except Exception:  # noqa: BLE001 - an undecodable value is treated as absent
        return None
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", "").strip()
    return text or None


def _request_attribute(ds: Dataset, keyword: str) -> str | None:
    """A text of the first RequestAttributesSequence item (where modalities put the order's fields)."""
    try:
        seq = ds.get("RequestAttributesSequence")
        return _text(seq[0], keyword) if seq else None
    except Exception:  # noqa: BLE001 - a malformed sequence is treated as absent
        return None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if isinstance(value, (MultiValue, list, tuple)):
            value = value[0] if value else None
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


# Fast path: raw (not yet converted) values decoded here for character sets without code
# extensions; pydicom's per-element conversion costs more than parsing the whole header.
# ISO 2022 sets (escape sequences, e.g. Japanese ISO 2022 IR 87) go through pydicom.
_FAST_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_TAGS = {kw: tag_for_keyword(kw) for kw in list(_TEXT.values()) + list(_INT.values()) + ["SpecificCharacterSet"]}
_US = {"Rows", "Columns", "BitsStored"}


def _codec(ds: Dataset) -> str | None:
    elem = ds._dict.get(_TAGS["SpecificCharacterSet"])
    if elem is None:
        return _FAST_CODECS[""]
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, (MultiValue, list, tuple)):
        value = "\\".join(value)
    value = (value or "").strip(" \x00")
    return _FAST_CODECS.get(value)


def _raw(ds: Dataset, keyword: str):
    """The raw value bytes and element if the element is still raw, else (None, element)."""
    elem = ds._dict.get(_TAGS[keyword])
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        return elem.value, elem
    return None, elem


def _fast_text(ds: Dataset, keyword: str, codec: str | None) -> str | None:
    raw, elem = _raw(ds, keyword)
    if elem is None:
        return None
    if raw is None or codec is None:
        return _text(ds, keyword)
    text = raw.decode(codec, "replace").replace("\x00", "").strip()
    if keyword == "PatientName":  # as pydicom's PersonName prints it: no empty trailing groups
        text = text.rstrip("=")
    return text or None


def _fast_int(ds: Dataset, keyword: str) -> int | None:
    raw, elem = _raw(ds, keyword)
    if elem is None:
        return None
    if raw is None:
        return _int(ds, keyword)
    try:
        if keyword in _US:
            if len(raw) < 2:
                return None
            return struct.unpack("<H" if elem.is_little_endian else ">H", raw[:2])[0]
        text = raw.decode("latin-1").strip(" \x00").split("\\")[0].strip()
        return int(text) if text else None
    except (ValueError, struct.error):
        return None


def extract_record(
    ds: Dataset,
    *,
    file_path: str | None = None,
    file_size: int = 0,
    transfer_syntax_uid: str | None = None,
    source_node: str | None = None,
    received_at: datetime | None = None,
) -> dict:
    """One index record from a header Dataset (pixel data not needed)."""
    codec = _codec(ds)
    rec: dict = {k: _fast_text(ds, kw, codec) for k, kw in _TEXT.items()}
    rec.update({k: _fast_int(ds, kw) for k, kw in _INT.items()})
    if not rec["requested_procedure_description"]:
        rec["requested_procedure_description"] = _request_attribute(ds, "RequestedProcedureDescription")
    rec["patient_id"] = rec["patient_id"] or ""
    rec["issuer"] = rec["issuer"] or ""
    if rec["patient_sex"]:
        rec["patient_sex"] = rec["patient_sex"].upper()
    if not transfer_syntax_uid:
        meta = getattr(ds, "file_meta", None)
        transfer_syntax_uid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else None
    rec["transfer_syntax_uid"] = transfer_syntax_uid or None
    if not rec["sop_class_uid"]:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID"):
            rec["sop_class_uid"] = str(meta.MediaStorageSOPClassUID)
    for k in _UIDS:
        if rec[k]:
            rec[k] = rec[k].rstrip("\x00 ")
    rec["file_path"] = file_path
    rec["file_size"] = int(file_size or 0)
    rec["source_node"] = source_node
    rec["received_at"] = received_at or datetime.now(timezone.utc)
    return rec


def age_years(patient_age: str | None, birth_date: str | None = None, study_date: str | None = None) -> float | None:
    """Age in years as the labeler reads it (PatientAge with or without unit, else birth and study
    dates); None when implausible (outside 0-120 years, placeholder birth date, born after the study)."""
    from app.labels.engine import plausible_age_years

    return plausible_age_years(patient_age, birth_date, study_date)
