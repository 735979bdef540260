"""De-identification of one DICOM dataset for a research export (PS3.15 Annex E).

The work is done by dicognito (a maintained library: names, IDs, addresses, equipment, UIDs, dates);
around it we add what a shared research dataset needs and dicognito leaves to its caller:

* Basic Application Level Confidentiality Profile with the options *Retain Longitudinal Temporal
  Information with Modified Dates* (one date shift per patient, so intervals within a patient hold),
  *Retain Patient Characteristics* (sex, age, size, weight kept; birth date emptied) and *Clean
  Descriptors* (descriptions kept with the patient's identifiers cut out; free-text comments removed);
* PatientID (and PatientName) become the deployment's pseudonym, the manifest's `patient_key`;
* UIDs are remapped by dicognito seeded from the pseudonym key: the same source UID maps to the same
  new UID in every export of the deployment, and no one without the key can reverse or recompute it;
* private attributes and overlays (which can carry burned-in text) are removed;
* PatientIdentityRemoved, DeidentificationMethod and DeidentificationMethodCodeSequence (CID 7050)
  say what was done.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

# DeidentificationMethod (LO, VM 1-n: each value at most 64 characters)
METHOD = ("PS3.15 Annex E Basic Application Confidentiality Profile",
          "Retain Longitudinal Temporal Information Modified Dates",
          "Retain Patient Characteristics", "Clean Descriptors")

# CID 7050 De-identification Method (DCM codes): the profile and the options applied
CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

# Modalities that commonly burn text (names, dates) into the pixels: with BurnedInAnnotation absent
# they are treated as "may contain burned-in text" (Annex E leaves pixel cleaning to the exporter)
BURNS_IN_TEXT = frozenset({"US", "SC", "XA", "RF", "ES", "OT", "DOC", "SM", "XC", "GM", "ECG"})

# Clean Descriptors: descriptions a researcher needs are kept but cut clean of the patient's own
# identifiers; free text with no research value and a high chance of names is removed (Annex E "X")
_DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
                "RequestedProcedureDescription", "AcquisitionDeviceProcessingDescription", "DerivationDescription",
                "BodyPartExamined", "ImageType")
_FREE_TEXT = ("ImageComments", "PatientComments", "StudyComments", "AdditionalPatientHistory",
              "InterpretationText", "RequestAttributesSequence", "ReferencedPatientSequence",
              "PatientBirthName", "PatientMotherBirthName", "OtherPatientIDsSequence", "PatientAddress",
              "AdmittingDiagnosesDescription", "MedicalAlerts", "Allergies", "ReasonForStudy",
              "RequestedContrastAgent", "TextValue", "ContentSequence")


@dataclass
class DeidOptions:
    """What the user chose: `burned_in` = "exclude" (default) or "flag"."""

    burned_in: str = "exclude"


@dataclass
class DeidResult:
    dataset: Dataset | None
    flagged: list[str] = field(default_factory=list)  # reasons the instance is included but flagged
    excluded: str | None = None  # reason it was left out


def burned_in_state(ds: Dataset) -> str | None:
    """"yes", "unknown" (absent on a modality that often burns in text) or None (no known risk)."""
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES":
        return "yes"
    if value == "NO":
        return None
    if str(ds.get("Modality", "") or "").upper() in BURNS_IN_TEXT:
        return "unknown"
    return None


def _seed(key: bytes, patient_key: str) -> str:
    # per patient: one date shift per patient (intervals kept within a patient, no shared offset that a
    # single known date would reveal); UIDs still map consistently because dicognito's UID mapping
    # depends on its seed and the source UID only, and the seed is keyed (not guessable without it)
    return hmac.new(key, b"dicom-deid\x1f" + patient_key.encode(), hashlib.sha256).hexdigest()


def _uid_seed(key: bytes) -> str:
    return hmac.new(key, b"dicom-deid-uids", hashlib.sha256).hexdigest()


class Deidentifier:
    """De-identify datasets of many patients consistently (one per export; not thread-safe)."""

    def __init__(self, key: bytes, options: DeidOptions | None = None):
        import dicognito
        from dicognito.anonymizer import Anonymizer
        from dicognito.randomizer import Randomizer
        from dicognito.uianonymizer import UIAnonymizer

        self.key = key
        self.options = options or DeidOptions()
        self.version = getattr(dicognito, "__version__", "")
        self._anonymizers: dict[str, Anonymizer] = {}
        # one UID mapping for the whole deployment: a study's UIDs are the same in every export and
        # references between instances (or to a frame of reference shared by patients) stay intact
        self._uids = UIAnonymizer(Randomizer(_uid_seed(key)))
        self._make = Anonymizer

    def _anonymizer(self, patient_key: str):
        a = self._anonymizers.get(patient_key)
        if a is None:
            a = self._make(seed=_seed(self.key, patient_key))
            a.add_element_handler(self._uids)  # first: the deployment-wide UID map wins over the per-patient one
            if len(self._anonymizers) > 10000:  # bounded memory on huge cohorts; rebuilt identically if needed
                self._anonymizers.clear()
            self._anonymizers[patient_key] = a
        return a

    def deidentify(self, ds: Dataset, patient_key: str) -> DeidResult:
        """De-identify `ds` in place; excluded (dataset None) when burned-in text is a risk and the
        option is "exclude"."""
        state = burned_in_state(ds)
        flagged = []
        if state is not None:
            reason = "burned_in_annotation" if state == "yes" else "burned_in_unknown"
            if self.options.burned_in == "exclude":
                return DeidResult(None, excluded=reason)
            flagged.append(reason)
        secrets_ = _identifiers(ds)
        _derive_age(ds)
        ds.remove_private_tags()
        for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF and t.group % 2 == 0]:
            del ds[tag]  # overlays (curves and text annotations drawn over the image)
        for kw in _FREE_TEXT:
            if kw in ds:
                delattr(ds, kw)
        self._anonymizer(patient_key).anonymize(ds)
        _clean_descriptors(ds, secrets_)
        # pseudonyms of the deployment: the manifest's patient_key, a name derived from it
        ds.PatientID = patient_key
        ds.PatientName = "RC^" + patient_key[:16]
        if "IssuerOfPatientID" in ds:
            del ds.IssuerOfPatientID
        ds.PatientBirthDate = ""  # not a patient characteristic Annex E retains (age is)
        if "PatientBirthTime" in ds:
            del ds.PatientBirthTime
        # burned-in text may still name the patient: such a (flagged) instance does not claim YES
        ds.PatientIdentityRemoved = "NO" if flagged else "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = [*METHOD, f"dicognito {self.version}"[:64]]
        codes = []
        for value, meaning in CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(codes)
        return DeidResult(ds, flagged=flagged)


def _derive_age(ds: Dataset) -> None:
    """PatientAge from birth and study dates when absent: the birth date goes, the age (a retained
    characteristic) is what a researcher needs from it."""
    if str(ds.get("PatientAge", "") or "").strip():
        return
    birth, on = str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or "")
    if not (re.fullmatch(r"\d{8}", birth) and re.fullmatch(r"\d{8}", on)):
        return
    years = int(on[:4]) - int(birth[:4]) - ((int(on[4:8]) < int(birth[4:8])))
    if 0 <= years <= 999:
        ds.PatientAge = f"{years:03d}Y"


def _identifiers(ds: Dataset) -> list[str]:
    """The patient's own identifying strings in this dataset (to cut out of descriptions), longest first."""
    out: list[str] = []
    for kw in ("PatientID", "AccessionNumber", "StudyID", "OtherPatientIDs", "InstitutionName", "PatientName",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName"):
        el = ds.get(kw)
        if el is None:
            continue
        values = list(el) if isinstance(el, (list, tuple)) or type(el).__name__ == "MultiValue" else [el]
        for v in values:
            text = str(v)
            out.append(text)
            if kw.endswith("Name"):
                out.extend(p for p in re.split(r"[\^= ]+", text))  # each name component on its own
    return sorted({s.strip() for s in out if s and len(s.strip()) >= 3}, key=len, reverse=True)


def _clean_descriptors(ds: Dataset, identifiers: list[str]) -> None:
    if not identifiers:
        return
    pattern = re.compile("|".join(re.escape(s) for s in identifiers), re.IGNORECASE)
    for kw in _DESCRIPTORS:
        el = ds.get(kw)
        if el is None or el == "":
            continue
        if isinstance(el, str):
            cleaned = pattern.sub("", el).strip()
            setattr(ds, kw, cleaned)
        elif hasattr(el, "__iter__"):
            setattr(ds, kw, [pattern.sub("", str(x)).strip() for x in el])
