"""Pseudonymous C-FIND: which matching keys identify a patient, and what an answer may carry.

Used by `POST /api/v1/pacs-nodes/{name}/find` and `radcohort find` alike. A matching key that
identifies a patient (name, IDs, birth date, accession number ...) would turn a wildcard find into
an identity oracle (prefix search recovers a name and ties it to the pseudonymous `patient_key`), so
it is refused unless the caller holds the `find-identified` scope (CLI: `--identified`); such a
search is audited. Answers never carry an identifying attribute, whoever asks.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydicom import Dataset

from app.dicom.queries import PATIENT_IDENTIFIERS, UNIQUE_KEY, result_to_dict
from app.privacy import patient_key

# matching keys that single out a patient (or a request that belongs to one)
IDENTIFYING_KEYS = PATIENT_IDENTIFIERS | frozenset({
    "PatientBirthDate", "PatientBirthTime", "AccessionNumber", "IssuerOfAccessionNumberSequence",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientMotherBirthName",
    "PatientInsurancePlanCodeSequence", "MilitaryRank", "BranchOfService", "AdmissionID",
    "IssuerOfAdmissionIDSequence", "PatientComments", "StudyID", "RequestedProcedureID",
    "ScheduledProcedureStepID", "PerformedProcedureStepID", "FillerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequest", "ResponsiblePerson", "PatientBirthDateInAlternativeCalendar",
})
# never in an answer: the identifying keys plus the staff and place names around a study
WITHHELD = IDENTIFYING_KEYS | frozenset({
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician", "InstitutionName", "InstitutionAddress",
    "StationName", "InstitutionalDepartmentName",
})

IDENTIFIED_SCOPE = "find-identified"


def _is_universal(value: object) -> bool:
    """'' / None / '*' match everything: the key is only asked back (and then withheld)."""
    return value is None or str(value).strip().strip("*") == ""


def identifying_match_keys(query: Mapping[str, object]) -> list[str]:
    """The keys of `query` that would match on a patient identifier (sorted)."""
    return sorted(k for k, v in query.items() if k in IDENTIFYING_KEYS and not _is_universal(v))


def refusal_detail(keys: list[str], loc_prefix: tuple[str, ...] = ("body", "query")) -> list[dict]:
    return [{"loc": [*loc_prefix, k], "type": "identifying_key",
             "msg": f"matching on {k} identifies a patient: it needs a token with the scope "
                    f"'{IDENTIFIED_SCOPE}' (the key may be asked back empty, and is then withheld)"}
            for k in keys]


def answer_rows(results: list[Dataset], level: str, pseudonym_key: bytes) -> list[dict[str, object]]:
    """The answers of one C-FIND without identifying attributes, each once: a PACS that repeats a
    row (pynetdicom's qrscp answers once per instance at every level) is shown each entity once."""
    unique = UNIQUE_KEY[level.upper()]
    seen: set[object] = set()
    out = []
    for ds in results:
        row = answer_row(ds, pseudonym_key)
        k = row.get("patient_key") if unique == "PatientID" else row.get(unique)
        if k:
            if k in seen:
                continue
            seen.add(k)
        out.append(row)
    return out


def answer_row(ds: Dataset, pseudonym_key: bytes) -> dict[str, object]:
    """One C-FIND answer without identifying attributes; `patient_key` (the cohort manifests' HMAC
    pseudonym) when the PACS returned a PatientID."""
    item = result_to_dict(ds, withhold=WITHHELD)
    pid = str(ds.get("PatientID", "") or "")
    if pid:
        item["patient_key"] = patient_key(pseudonym_key, pid, str(ds.get("IssuerOfPatientID", "") or ""))
    return item
