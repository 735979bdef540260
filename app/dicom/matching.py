"""Does a C-FIND answer match the query that asked for it? DICOM matching (PS3.4 C.2.2.2) on our side.

A PACS may ignore matching keys it does not index (dcmtk's dcmqrscp, pynetdicom's qrscp, many
archives): its answers then carry values the query excluded. Verify every answer before acting on it.

    matches("StudyDate", "20110101-20161231", "20120304")   -> True
    matches("ModalitiesInStudy", "DX", ["CR", "DX"])        -> True   (any value of a multi-valued answer)
    matches("BodyPartExamined", "CHEST", None)             -> None   (the answer lacks it: cannot verify)
    verify({"Modality": "CR", "PatientSex": "F"}, ds)       -> Verification(ok=True, unverifiable=["PatientSex"])

Rules, per matching value (`wanted`):
- "" or "*": universal matching, always True (even when the answer lacks the attribute).
- A backslash-separated list: matches when any element matches (UID list matching for UI; multiple
  value matching for the other VRs).
- DA / TM / DT: a single value or a range "lo-hi", "lo-", "-hi". Partial times and date-times are
  widened (TM "08" = 08:00:00 to 08:59:59.999999); DT UTC offsets are ignored (compared as written).
- UI: exact. Numbers (IS, DS, US, ...): numeric equality.
- Other string VRs: "*" (any run) and "?" (one character) wildcards, otherwise exact after stripping
  padding spaces; case-sensitive except PN, which is compared case-insensitively as PS3.4 allows.
- The answer: a str, a pydicom MultiValue / list (any element may match), PersonName, date/time
  objects or numbers. A missing attribute (None) or an empty value gives None: the PACS did not say,
  so the answer cannot be verified (a PACS that does not store a key returns it empty or not at all).

Pure: no network, no database.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any, NamedTuple

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

__all__ = ["matches", "verify", "mismatched_keys", "Verification", "SKIP_KEYS"]

# never matching keys: the level itself and keys that only steer the query
SKIP_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "QueryRetrieveView", "TimezoneOffsetFromUTC"})

_NUM_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}


class Verification(NamedTuple):
    """`ok`: no verifiable key contradicts the query; `unverifiable`: keys the answer does not carry."""

    ok: bool
    unverifiable: list[str]


def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return "LO"  # unknown keyword: compare as a string
    try:
        return dictionary_VR(tag).split(" or ")[0]  # 'US or SS' and the like: numbers either way
    except KeyError:
        return "LO"


def _answer_values(value: Any) -> list[str] | None:
    """The answer as a list of stripped strings; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        out = [v for item in value for v in (_answer_values(item) or [])]
        return out or None
    if isinstance(value, datetime):
        s = value.strftime("%Y%m%d%H%M%S") + (f".{value.microsecond:06d}" if value.microsecond else "")
    elif isinstance(value, date):
        s = value.strftime("%Y%m%d")
    elif isinstance(value, time):
        s = value.strftime("%H%M%S") + (f".{value.microsecond:06d}" if value.microsecond else "")
    else:
        s = str(value)
    if hasattr(value, "original_string") and getattr(value, "original_string", None):
        s = str(value.original_string)  # pydicom's DA/TM/DT keep what the PACS sent
    parts = [p.strip(" \x00") for p in s.split("\\")]
    parts = [p for p in parts if p]
    return parts or None


# ---- dates and times: normalise to fixed-width digit strings that compare lexically

def _da(s: str) -> str:
    return s.replace(".", "").replace("-", "")  # ACR-NEMA 'YYYY.MM.DD' too


def _tm(s: str, high: bool) -> str:
    main, _, frac = s.replace(":", "").partition(".")
    fill = "9" if high else "0"
    if len(main) < 6:  # a partial time stands for the whole hour / minute
        main, frac = main + ("235959" if high else "000000")[len(main):], ""
    return f"{main[:6]}.{(frac + fill * 6)[:6]}"


def _dt(s: str, high: bool) -> str:
    s = re.sub(r"[+-]\d{4}$", "", s)  # offsets ignored: compared as written
    d, t = s[:8], s[8:]
    if len(d) < 8:  # a partial date stands for the whole year / month
        d, t = d + ("99991231" if high else "00000101")[len(d):], ""
    return d + (_tm(t, high) if t else ("235959.999999" if high else "000000.000000"))


def _range_match(vr: str, wanted: str, got: str) -> bool:
    if vr == "DT":
        m = re.match(r"^(\d*(?:[+-]\d{4})?)-(\d*(?:[+-]\d{4})?)$", wanted)
        lo, hi, is_range = (m.group(1), m.group(2), True) if m else (wanted, wanted, False)
    elif "-" in wanted:
        lo, _, hi = wanted.partition("-")
        is_range = True
    else:
        lo = hi = wanted
        is_range = False
    if vr == "DA":
        g = _da(got)[:8]
        if not is_range:
            return g == _da(wanted)
        return (not lo or g >= _da(lo)) and (not hi or g <= _da(hi))
    if vr == "TM":
        g_lo, g_hi = _tm(got, False), _tm(got, True)
        return (not lo or g_hi >= _tm(lo, False)) and (not hi or g_lo <= _tm(hi, True))
    g_lo, g_hi = _dt(got, False), _dt(got, True)  # DT
    return (not lo or g_hi >= _dt(lo, False)) and (not hi or g_lo <= _dt(hi, True))


def _wildcard(wanted: str, got: str, ignore_case: bool) -> bool:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wanted)
    return re.fullmatch(pattern, got, re.DOTALL | (re.IGNORECASE if ignore_case else 0)) is not None


def _one(vr: str, wanted: str, got: str) -> bool:
    if vr in ("DA", "TM", "DT"):
        return _range_match(vr, wanted, got)
    if vr == "UI":
        return wanted == got
    if vr in _NUM_VRS:
        try:
            return float(wanted) == float(got)
        except ValueError:
            return wanted == got
    ignore_case = vr == "PN"
    if "*" in wanted or "?" in wanted:
        return _wildcard(wanted, got, ignore_case)
    return wanted.lower() == got.lower() if ignore_case else wanted == got


def matches(keyword: str, wanted: str | None, answer_value: Any) -> bool | None:
    """Does `answer_value` (what the PACS returned for `keyword`) match the matching value `wanted`?

    True / False, or None when the answer lacks the attribute (or left it empty): cannot verify.
    """
    wanted = (wanted or "").strip(" ")
    if wanted in ("", "*"):
        return True
    vr = _vr(keyword)
    if vr == "SQ":
        return None  # sequence matching is not supported: cannot verify
    got = _answer_values(answer_value)
    if got is None:
        return None
    alternatives = [w.strip(" ") for w in wanted.split("\\")]
    return any(_one(vr, w, g) for w in alternatives if w for g in got)


def _answer_get(answer: Any, keyword: str) -> Any:
    if isinstance(answer, Mapping):
        return answer.get(keyword)
    if keyword not in answer:  # a pydicom Dataset
        return None
    return answer[keyword].value


def verify(query: Mapping[str, Any], answer: Any) -> Verification:
    """Check one C-FIND answer (a pydicom Dataset, or a {keyword: value} dict) against the query.

    Return keys (empty values) and SKIP_KEYS are not checked. `ok` is False when any key the answer
    carries contradicts the query; `unverifiable` lists the matching keys the answer does not carry.
    Accept an answer for retrieval only when `ok and not unverifiable`.
    """
    unverifiable: list[str] = []
    ok = True
    for keyword, wanted in query.items():
        if keyword in SKIP_KEYS or wanted is None or str(wanted).strip(" ") in ("", "*"):
            continue
        m = matches(keyword, str(wanted), _answer_get(answer, keyword))
        if m is None:
            unverifiable.append(keyword)
        elif not m:
            ok = False
    return Verification(ok, unverifiable)


def mismatched_keys(query: Mapping[str, Any], answer: Any) -> list[str]:
    """The matching keys whose value in `answer` contradicts the query (for reports)."""
    return [k for k, w in query.items()
            if k not in SKIP_KEYS and w is not None and str(w).strip(" ") not in ("", "*")
            and matches(k, str(w), _answer_get(answer, k)) is False]
