"""Typed C-FIND queries -> identifier Datasets (Study Root and Patient Root), with validation.

A query is a mapping of DICOM keywords to matching values; an empty value asks for the key to be
returned. Values follow DICOM matching: ranges for DA/TM/DT (``20110101-20161231``), ``*``/``?``
wildcards for string VRs, backslash-separated UID lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from app.errors import InvalidInput

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
ROOTS = ("study", "patient")

# Which level a keyword belongs to (the usual Q/R attributes); anything else is treated as IMAGE level.
PATIENT_KEYS = frozenset({
    "PatientID", "PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
})
STUDY_KEYS = frozenset({
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "ModalitiesInStudy", "PatientAge", "InstitutionName",
    "RequestedProcedureDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
})
SERIES_KEYS = frozenset({
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
    "ProtocolName", "Laterality", "SeriesDate", "NumberOfSeriesRelatedInstances",
})

# Return keys asked for by default at each level (besides the user's own keys).
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientID", "PatientSex", "PatientBirthDate", "NumberOfPatientRelatedStudies"),
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "PatientID", "PatientSex", "PatientBirthDate",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
# Unique keys of the levels above, for the hierarchical model.
UNIQUE_KEY = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
              "IMAGE": "SOPInstanceUID"}

# Never handed out by the API or CLI (privacy): they may still be used as matching keys.
PATIENT_IDENTIFIERS = frozenset({
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "IssuerOfPatientID", "MedicalRecordLocator",
})

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_NUM_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}
_NO_WILDCARD_VRS = {"DA", "TM", "DT", "UI"} | _NUM_VRS
_FREE_TEXT_VRS = {"LT", "ST", "UT"}  # cannot be matched, only returned


def key_level(keyword: str) -> str:
    """The Q/R level a keyword belongs to."""
    if keyword in PATIENT_KEYS:
        return "PATIENT"
    if keyword in STUDY_KEYS:
        return "STUDY"
    if keyword in SERIES_KEYS:
        return "SERIES"
    return "IMAGE"


def _check_range(value: str, pattern: re.Pattern, field: str, vr: str) -> None:
    parts = value.split("-") if vr != "DT" else _split_dt_range(value)
    if len(parts) > 2 or (len(parts) == 2 and not parts[0] and not parts[1]):
        raise InvalidInput(f"{field}: '{value}' is not a valid {vr} value or range")
    for p in parts:
        if p and not pattern.match(p):
            raise InvalidInput(f"{field}: '{value}' is not a valid {vr} value or range")
        if p and vr == "DA":
            try:
                date(int(p[:4]), int(p[4:6]), int(p[6:8]))
            except ValueError:
                raise InvalidInput(f"{field}: '{p}' is not a calendar date (YYYYMMDD)") from None
    if len(parts) == 2 and parts[0] and parts[1] and parts[0] > parts[1]:
        raise InvalidInput(f"{field}: range '{value}' has its start after its end")


def _split_dt_range(value: str) -> list[str]:
    # a DT may carry a -HHMM offset: split on the dash that separates two DT values
    m = re.match(r"^(\d*(?:[+-]\d{4})?)-(\d*(?:[+-]\d{4})?)$", value)
    return [m.group(1), m.group(2)] if m else [value]


def validate_value(keyword: str, value: object) -> str:
    """Check one matching value against its keyword's VR; return it as a string ('' = return key)."""
    field = f"query.{keyword}"
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: value must be a string")
    vr = dictionary_VR(tag_for_keyword(keyword))
    # UID lists (several studies/instances in one retrieve) may be long; a 16-bit length bounds them
    if len(value) > (65534 if vr == "UI" else 1024) or any(ord(c) < 32 for c in value):
        raise InvalidInput(f"{field}: value too long or contains control characters")
    if not value:
        return ""
    if vr in _NO_WILDCARD_VRS and any(c in value for c in "*?"):
        raise InvalidInput(f"{field}: wildcards are not allowed for VR {vr}")
    if vr == "DA":
        _check_range(value, _DA_RE, field, vr)
    elif vr == "TM":
        _check_range(value, _TM_RE, field, vr)
    elif vr == "DT":
        _check_range(value, _DT_RE, field, vr)
    elif vr == "UI":
        for uid in value.split("\\"):
            if len(uid) > 64 or not _UID_RE.match(uid):
                raise InvalidInput(f"{field}: '{uid}' is not a DICOM UID")
    elif vr in _NUM_VRS:
        try:
            float(value)
        except ValueError:
            raise InvalidInput(f"{field}: '{value}' is not a number") from None
    elif vr in _FREE_TEXT_VRS:
        raise InvalidInput(f"{field}: {vr} attributes cannot be used for matching, only returned")
    return value


def validate_query(query: Mapping[str, object] | None) -> dict[str, str]:
    """Validate keywords and values; unknown keywords raise InvalidInput naming the field."""
    if query is None:
        return {}
    if not isinstance(query, Mapping):
        raise InvalidInput("query: must be an object of DICOM keyword -> value")
    out: dict[str, str] = {}
    for keyword, value in query.items():
        if not isinstance(keyword, str) or tag_for_keyword(keyword) is None:
            raise InvalidInput(f"query.{keyword}: unknown DICOM keyword")
        vr = dictionary_VR(tag_for_keyword(keyword))
        if vr == "SQ":
            raise InvalidInput(f"query.{keyword}: sequence attributes are not supported")
        if keyword == "QueryRetrieveLevel":
            raise InvalidInput("query.QueryRetrieveLevel: set the level with 'level', not in the query")
        out[keyword] = validate_value(keyword, value)
    return out


def check_level(level: str, root: str = "study") -> tuple[str, str]:
    lvl = (level or "").upper()
    if lvl not in LEVELS:
        raise InvalidInput(f"level: must be one of {', '.join(LEVELS)}")
    r = (root or "study").lower()
    if r not in ROOTS:
        raise InvalidInput(f"root: must be one of {', '.join(ROOTS)}")
    if r == "study" and lvl == "PATIENT":
        raise InvalidInput("level: PATIENT level needs the patient root (root='patient')")
    return lvl, r


def build_identifier(level: str, query: Mapping[str, object] | None = None, root: str = "study",
                     return_keys: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """The C-FIND/C-MOVE/C-GET identifier for `query` at `level` (validated)."""
    lvl, _ = check_level(level, root)
    keys = validate_query(query)
    ds = Dataset()
    ds.QueryRetrieveLevel = lvl
    wanted = dict.fromkeys(RETURN_KEYS[lvl] if return_keys is None else return_keys, "")
    wanted.update(keys)
    # Wildcards and ranges are valid matching values but not valid stored values: skip pydicom's
    # value validation for the identifier only.
    with pydicom_config.disable_value_validation():
        for keyword, value in wanted.items():
            tag = tag_for_keyword(keyword)
            ds.add(DataElement(tag, dictionary_VR(tag), value if value != "" else None))
    return ds


def to_json_value(value: object) -> object:
    """A JSON-friendly rendering of a pydicom value."""
    if value is None:
        return None
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, (MultiValue, list, tuple)):
        return [to_json_value(v) for v in value]
    if isinstance(value, bytes):
        return None
    if isinstance(value, (int, float, str)):
        return value if not hasattr(value, "original_string") else str(value)
    return str(value)


def result_to_dict(ds: Dataset, *, withhold: frozenset[str] = frozenset()) -> dict[str, object]:
    """A C-FIND answer as {keyword: value}, without status/bookkeeping keys and withheld keys."""
    out: dict[str, object] = {}
    for elem in ds:
        kw = elem.keyword or keyword_for_tag(elem.tag)
        if not kw or kw in withhold or kw in ("SpecificCharacterSet", "RetrieveAETitle") or elem.VR == "SQ":
            continue
        out[kw] = to_json_value(elem.value)
    return out
