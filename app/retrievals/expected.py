"""The expected list of a retrieval: image-level C-FIND, split when the PACS caps its answer.

A capped answer (0xFE00, e.g. Orthanc's LimitFindInstances) is split by bisecting the StudyDate
range; a single day still capped is split by study, then by series. A series that is still capped
cannot be split further: the listing is marked incomplete with a note.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

from app.dicom.queries import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS
from app.dicom.scu import DicomClient

log = logging.getLogger("radcohort.retrievals")

# Open ends of a StudyDate range when bisecting (studies without a StudyDate cannot be reached by
# date-range splitting; they are only found when the unsplit answer is not capped).
MIN_DATE = date(1900, 1, 1)
MAX_DATE = date(2099, 12, 31)
IMAGE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


@dataclass(frozen=True)
class ExpectedInstance:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str = ""


@dataclass
class Listing:
    items: dict[str, ExpectedInstance] = field(default_factory=dict)
    finds: int = 0
    splits: int = 0
    incomplete: bool = False
    notes: list[str] = field(default_factory=list)


def _d(s: str) -> date:
    return date(int(s[:4]), int(s[4:6]), int(s[6:8]))


def _s(d: date) -> str:
    return d.strftime("%Y%m%d")


def date_bounds(value: str | None) -> tuple[date, date]:
    """[lo, hi] of a DA matching value ('', 'D', 'D-', '-D', 'D1-D2')."""
    if not value:
        return MIN_DATE, MAX_DATE
    if "-" not in value:
        return _d(value), _d(value)
    lo, hi = value.split("-", 1)
    return (_d(lo) if lo else MIN_DATE), (_d(hi) if hi else MAX_DATE)


def list_expected(client: DicomClient, query: dict[str, str],
                  on_find: Callable[[Listing], None] | None = None) -> Listing:
    """Every instance matching `query` (validated keywords), as SOP/series/study UIDs."""
    out = Listing()

    def find(level: str, q: dict[str, str], keys: tuple[str, ...]):
        res = client.find(level, q, return_keys=keys)
        out.finds += 1
        if on_find:
            on_find(out)
        return res

    def add(results) -> None:
        for ds in results:
            sop = str(ds.get("SOPInstanceUID", "") or "").strip()
            if not sop:
                continue
            out.items[sop] = ExpectedInstance(sop, str(ds.get("SeriesInstanceUID", "") or "").strip(),
                                              str(ds.get("StudyInstanceUID", "") or "").strip(),
                                              str(ds.get("SOPClassUID", "") or "").strip())

    def collect(q: dict[str, str]) -> None:
        res = find("IMAGE", q, IMAGE_KEYS)
        add(res.results)
        if not res.capped:
            return
        out.splits += 1
        if "SeriesInstanceUID" in q and q["SeriesInstanceUID"]:
            out.incomplete = True
            out.notes.append(f"series {q['SeriesInstanceUID']} has more instances than the PACS's result "
                             f"cap; raise the PACS's limit (e.g. Orthanc LimitFindInstances)")
            return
        if "StudyInstanceUID" in q and q["StudyInstanceUID"]:
            return by_series(q)
        lo, hi = date_bounds(q.get("StudyDate"))
        if lo < hi:
            mid = lo + timedelta(days=(hi - lo).days // 2)
            log.info("C-FIND capped for %s..%s: splitting the date range", lo, hi)
            collect({**q, "StudyDate": f"{_s(lo)}-{_s(mid)}"})
            collect({**q, "StudyDate": f"{_s(mid + timedelta(days=1))}-{_s(hi)}"})
            return
        by_study(q)

    def by_study(q: dict[str, str]) -> None:
        sq = {k: v for k, v in q.items() if k in PATIENT_KEYS or k in STUDY_KEYS}
        res = find("STUDY", sq, ("StudyInstanceUID",))
        if res.capped:
            out.incomplete = True
            out.notes.append(f"more studies on {q.get('StudyDate')} than the PACS's result cap")
        for ds in res.results:
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
            if uid:
                collect({**q, "StudyInstanceUID": uid})

    def by_series(q: dict[str, str]) -> None:
        sq = {k: v for k, v in q.items() if k in SERIES_KEYS or k == "StudyInstanceUID"}
        res = find("SERIES", sq, ("StudyInstanceUID", "SeriesInstanceUID"))
        if res.capped:
            out.incomplete = True
            out.notes.append(f"study {q['StudyInstanceUID']} has more series than the PACS's result cap")
        for ds in res.results:
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            if uid:
                collect({**q, "SeriesInstanceUID": uid})

    collect(dict(query))
    return out
