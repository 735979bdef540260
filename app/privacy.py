"""Patient identifiers out of every log line, whoever writes it.

pynetdicom logs whole C-FIND identifiers (one `(0010,0020) LO [12345] # 1 PatientID` line per element)
at INFO, and pydicom's `str(dataset)` or an exception message can carry a name as well. Filtering at
our own loggers is not enough: the redaction is installed as the *log record factory*, so it applies
to every logger (ours, pynetdicom's, uvicorn's, alembic's), every handler and every level, before any
handler sees the record. Values are replaced, the line stays, so a DEBUG log still shows which element
was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Callable

REDACTED = "<redacted>"


def patient_key(key: bytes, patient_id: str, issuer: str | None = "") -> str:
    """HMAC-SHA256 pseudonym of a patient (issuer-qualified ID); never reversible without the key.
    The one pseudonym of the deployment: manifests, find answers and conflicts all use it."""
    msg = f"{issuer or ''}\x1f{patient_id}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()

# Attributes that identify a patient (PS3.15 Annex E, the ones a Q/R identifier or a header dump
# commonly carries). Group 0010 is redacted whole but for these descriptive, non-identifying ones.
_PATIENT_GROUP_KEEP = {0x0040, 0x1010, 0x1020, 0x1030, 0x2160, 0x21A0, 0x2203}  # sex, age, size, weight ...
_OTHER_IDENTIFYING = {
    (0x0008, 0x0050),  # AccessionNumber
    (0x0008, 0x0080), (0x0008, 0x0081),  # InstitutionName / Address
    (0x0008, 0x0090), (0x0008, 0x0092), (0x0008, 0x0094),  # ReferringPhysician name / address / phone
    (0x0008, 0x1048), (0x0008, 0x1050), (0x0008, 0x1060), (0x0008, 0x1070),  # physicians, operators
    (0x0020, 0x0010),  # StudyID
    (0x0032, 0x1032), (0x0032, 0x1033),  # RequestingPhysician / Service
    (0x0038, 0x0010), (0x0038, 0x0400),  # AdmissionID, PatientInstitutionResidence
    (0x0040, 0x0006), (0x0040, 0x2016), (0x0040, 0x2017), (0x0040, 0xA123),  # performer, order numbers
    (0x0040, 0x1001),  # RequestedProcedureID
}
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID", "MedicalRecordLocator",
    "AccessionNumber", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "RequestingPhysician", "InstitutionName", "InstitutionAddress", "StudyID",
    "AdmissionID", "PersonName", "PatientComments", "EthnicGroup", "MilitaryRank", "Occupation",
)


def is_identifying_tag(group: int, element: int) -> bool:
    """Whether the attribute (group, element) identifies a patient (and must not be logged)."""
    if group == 0x0010:
        return element not in _PATIENT_GROUP_KEEP
    return (group, element) in _OTHER_IDENTIFYING


_TAG = r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)"
# pynetdicom's pretty_element: "(0010,0020) LO [12345]  # 1 PatientID"
_PRETTY = re.compile(_TAG + r"(\s+[A-Z]{2}\s+)\[(.*?)\](?=\s+#|\s*$)", re.M)
# pydicom's str(dataset) / repr(element): "(0010,0010) Patient's Name   PN: 'Doe^John'"
_PYDICOM = re.compile(_TAG + r"([^\n]*?\b[A-Z]{2}: )(.*)$", re.M)
# keyword = value / 'keyword': 'value' / keyword: value, as in dicts, reprs and our own messages
_KEYWORD = re.compile(
    r"""(?P<k>['"]?\b(?:""" + "|".join(IDENTIFYING_KEYWORDS) + r""")\b['"]?\s*[:=]\s*)"""
    r"""(?P<v>'[^'\n]*'|"[^"\n]*"|\[[^\]\n]*\]|[^\s,;)}\]]+)""")


def _tag_sub(m: re.Match) -> str:
    """Both tag patterns keep the value in group 4: replace it when the tag identifies a patient."""
    if not is_identifying_tag(int(m.group(1), 16), int(m.group(2), 16)):
        return m.group(0)
    start, end = m.start(4) - m.start(0), m.end(4) - m.start(0)
    return m.group(0)[:start] + REDACTED + m.group(0)[end:]


def redact_text(text: str) -> str:
    """`text` with the values of identifying DICOM attributes replaced by `<redacted>`."""
    if "(" in text:
        text = _PRETTY.sub(_tag_sub, text)
        text = _PYDICOM.sub(_tag_sub, text)
    return _KEYWORD.sub(lambda m: m.group("k") + REDACTED, text)


_base_factory: Callable[..., logging.LogRecord] | None = None


def _redacting_factory(*args, **kwargs) -> logging.LogRecord:
    assert _base_factory is not None  # installed before this factory is
    record = _base_factory(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string must still be logged, just as logging would
        message = f"{record.msg!r} {record.args!r}"
    redacted = redact_text(message)
    if redacted != message:
        # keep the record's shape where the arguments alone carried the identifier: some formatters
        # read the arguments themselves (uvicorn's access log unpacks them)
        if isinstance(record.args, tuple) and record.args:
            safe = tuple(redact_text(a) if isinstance(a, str) else a for a in record.args)
            try:
                same = (str(record.msg) % safe) == redacted
            except Exception:  # noqa: BLE001
                same = False
            if same:
                record.args = safe
            else:
                record.msg, record.args = redacted, ()
        else:
            record.msg, record.args = redacted, ()
    if record.exc_info and record.exc_info[0] is not None:
        # formatted now, so that no handler formats the raw exception (its text can hold a name)
        record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def install_log_redaction() -> None:
    """Redact identifiers in every log record made in this process from now on (idempotent)."""
    global _base_factory
    if _base_factory is None:
        _base_factory = logging.getLogRecordFactory()
        logging.setLogRecordFactory(_redacting_factory)


# third-party loggers that speak at INFO about every PDU, request or migration step
_CHATTY = ("pynetdicom", "alembic", "httpx", "httpcore", "PIL", "matplotlib", "urllib3")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record, not the one at set-up (a CLI
    invoked in-process, e.g. by a test runner, swaps sys.stderr and closes it afterwards)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str = "INFO", dicom_level: str | None = None, fmt: str | None = None) -> None:
    """Process-wide logging for every radcohort entry point: stderr, redacted, third parties quiet.

    `dicom_level` sets pynetdicom's level (default WARNING: its INFO is one line per element of every
    identifier). Logs go to stderr so that a command's own output on stdout stays readable.
    """
    install_log_redaction()
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(getattr(h, "_radcohort", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(fmt or "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._radcohort = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for name in _CHATTY:
        logging.getLogger(name).setLevel("WARNING")
    if dicom_level:
        logging.getLogger("pynetdicom").setLevel(dicom_level.upper())
