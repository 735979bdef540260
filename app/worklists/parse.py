"""Reading an uploaded worklist (CSV or XLSX) into rows, with a clear error per row and per file.

A bad row (empty key, malformed date, duplicate, a UID that is not one) is kept as `invalid` with its
reason and never stops the good rows; only a file that cannot be read at all (not CSV/XLSX, no key
column, too many rows) is refused as a whole.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from app.errors import InvalidInput, RadcohortError

MAX_ROWS = 50_000
MAX_BYTES = 20 * 2**20
KEY_TYPES = ("StudyInstanceUID", "AccessionNumber", "PatientID")
IDENTIFYING_KEY_TYPES = frozenset({"AccessionNumber", "PatientID"})

# header spelling -> attribute (case, spaces, '_' and '-' ignored)
_ALIASES = {
    "studyinstanceuid": "StudyInstanceUID", "studyuid": "StudyInstanceUID", "suid": "StudyInstanceUID",
    "accessionnumber": "AccessionNumber", "accession": "AccessionNumber", "accessionno": "AccessionNumber",
    "acc": "AccessionNumber",
    "patientid": "PatientID", "mrn": "PatientID", "pid": "PatientID",
    "studydate": "StudyDate", "date": "StudyDate",
    "modality": "ModalitiesInStudy", "modalities": "ModalitiesInStudy", "modalitiesinstudy": "ModalitiesInStudy",
    "studydescription": "StudyDescription", "description": "StudyDescription",
}
FILTERS = ("StudyDate", "ModalitiesInStudy", "StudyDescription")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE = re.compile(r"^\d{8}$")


class FileRefused(RadcohortError):
    """The whole file is unusable (the API answers it with its status)."""


@dataclass
class ParsedRow:
    row: int
    key: str | None
    filters: dict
    status: str  # pending | invalid
    detail: str | None = None


@dataclass
class ParsedWorklist:
    key_type: str
    rows: list[ParsedRow]
    warnings: list[dict] = field(default_factory=list)  # file-level: ignored columns ...


def _norm(h: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(h or "")).lower()


def _date(v: str) -> str:
    """YYYYMMDD or YYYY-MM-DD, or a range A-B / A..B of those; ValueError with the reason."""
    import datetime as dt

    s = v.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        parts = [s]
    elif ".." in s:
        parts = [p.strip() for p in s.split("..")]
    elif re.fullmatch(r"\d{8}\s*-\s*\d{8}", s):
        parts = [p.strip() for p in s.split("-")]
    else:
        parts = [s]
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"date {v[:40]!r}: use YYYYMMDD, YYYY-MM-DD or a range YYYYMMDD-YYYYMMDD")
    out = []
    for p in parts:
        q = p.replace("-", "") if re.fullmatch(r"\d{4}-\d{2}-\d{2}", p) else p
        if not _DATE.match(q):
            raise ValueError(f"date {v[:40]!r}: use YYYYMMDD, YYYY-MM-DD or a range YYYYMMDD-YYYYMMDD")
        try:
            dt.date(int(q[:4]), int(q[4:6]), int(q[6:]))
        except ValueError:
            raise ValueError(f"date {v[:40]!r}: {q} is not a calendar date") from None
        out.append(q)
    if len(out) == 2 and out[0] > out[1]:
        raise ValueError(f"date range {v[:40]!r} ends before it starts")
    return "-".join(out)


def _table(data: bytes, filename: str | None) -> list[list[str]]:
    """The file's cells as text rows: XLSX (first sheet) by its zip signature, else CSV text."""
    if not data.strip():
        raise FileRefused("file: empty", status_code=422)
    if len(data) > MAX_BYTES:
        raise FileRefused(f"file: larger than {MAX_BYTES // 2**20} MiB", status_code=413)
    if data[:4] == b"PK\x03\x04":
        try:
            import openpyxl

            wb = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
            ws = wb.worksheets[0]
            rows = []
            for r in ws.iter_rows(values_only=True):
                rows.append(["" if c is None else (c.strftime("%Y%m%d") if hasattr(c, "strftime") else str(c))
                             for c in r])
                if len(rows) > MAX_ROWS + 1:
                    break
            wb.close()
            return rows
        except Exception as exc:  # noqa: BLE001 - any zip that is not a workbook
            raise FileRefused(f"file: not a readable XLSX workbook ({type(exc).__name__})", status_code=415) from exc
    if b"\x00" in data[:4096] or data[:4] in (b"\xd0\xcf\x11\xe0",) or data[:5] == b"%PDF-":
        raise FileRefused("file: not CSV or XLSX (binary content; legacy .xls is not supported, save as .xlsx)",
                          status_code=415)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # Excel's "CSV" on Windows
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = []
    try:
        for r in csv.reader(io.StringIO(text, newline=""), dialect):
            rows.append(r)
            if len(rows) > MAX_ROWS + 1:
                break
    except csv.Error as exc:
        raise FileRefused(f"file: not readable as CSV near line {len(rows) + 1} ({exc})", status_code=422) from exc
    return rows


def parse(data: bytes, filename: str | None = None, column: str | None = None) -> ParsedWorklist:
    """Rows of an uploaded worklist. FileRefused for an unusable file; bad rows come back `invalid`."""
    table = _table(data, filename)
    while table and not any(c.strip() for c in table[0]):
        table.pop(0)
    if not table:
        raise FileRefused("file: no header row", status_code=422)
    header, body = table[0], table[1:]
    if len(body) > MAX_ROWS:
        raise FileRefused(f"file: more than {MAX_ROWS} rows; split the worklist", status_code=413)
    cols: dict[str, int] = {}
    warnings = []
    for i, h in enumerate(header):
        if not str(h).strip():
            continue
        attr = _ALIASES.get(_norm(h))
        if attr is None:
            warnings.append({"column": str(h)[:64], "msg": "unknown column, ignored; known: "
                             + ", ".join(KEY_TYPES + FILTERS) + " (or their common spellings)"})
        elif attr in cols:
            warnings.append({"column": str(h)[:64], "msg": f"second column for {attr}, ignored"})
        else:
            cols[attr] = i
    if column is not None:
        key_type = _ALIASES.get(_norm(column))
        if key_type not in KEY_TYPES:
            raise InvalidInput(f"column: {column!r} is not a key column; use one of {', '.join(KEY_TYPES)}")
        if key_type not in cols:
            raise InvalidInput(f"column: the file has no {key_type} column (header: "
                               f"{', '.join(str(h)[:32] for h in header if str(h).strip())[:300]})")
    else:
        present = [k for k in KEY_TYPES if k in cols]
        if not present:
            raise FileRefused("file: no key column; the header needs one of " + ", ".join(KEY_TYPES), status_code=422)
        if len(present) > 1:
            raise InvalidInput(f"column: the file has several key columns ({', '.join(present)}); name the one "
                               "to match on with `column`")
        key_type = present[0]
    rows: list[ParsedRow] = []
    seen: dict[tuple, int] = {}
    for n, cells in enumerate(body, start=2):
        if not any(str(c).strip() for c in cells):
            continue  # blank line

        def get(a: str, cells=cells) -> str:
            return str(cells[cols[a]]).strip() if a in cols and cols[a] < len(cells) else ""

        key = get(key_type)
        filters, problems = {}, []
        for f in FILTERS:
            v = get(f)
            if not v:
                continue
            if f == "StudyDate":
                try:
                    v = _date(v)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
            elif f == "ModalitiesInStudy":
                v = v.upper()
                if not re.fullmatch(r"[A-Z0-9 _]{1,16}", v):
                    problems.append(f"modality {v[:20]!r}: a DICOM modality code such as CR, DX")
                    continue
            elif len(v) > 64:
                problems.append("description: at most 64 characters")
                continue
            filters[f] = v
        if not key:
            problems.insert(0, f"empty {key_type}")
        elif len(key) > 64 or any(c in key for c in "\\*?"):
            problems.insert(0, f"{key_type}: at most 64 characters, no wildcards or backslashes")
        elif key_type == "StudyInstanceUID" and not _UID.match(key):
            problems.insert(0, "StudyInstanceUID: not a UID (digits and dots)")
        if not problems:
            ident = (key, tuple(sorted(filters.items())))
            if ident in seen:
                problems.append(f"duplicate of row {seen[ident]}")
            else:
                seen[ident] = n
        rows.append(ParsedRow(n, key or None, filters, "invalid" if problems else "pending",
                              "; ".join(problems) if problems else None))
    if not rows:
        raise FileRefused("file: no data rows under the header", status_code=422)
    return ParsedWorklist(key_type, rows, warnings)
