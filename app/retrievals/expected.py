"""The expected list of a retrieval: a hierarchical, verified walk STUDY -> SERIES -> IMAGE.

PS3.4 C.4.1.2.2's hierarchical model: each level is asked with the unique keys of the levels above
and only the matching keys that belong to it (a strict PACS refuses anything else with 0xA900; a lax
one ignores what it does not index). Every answer is then checked against every matching value the
user gave, on our side: a PACS that ignored a key (dcmqrscp ignores keys it does not index), repeated
a row (pynetdicom's qrscp) or answered outside the query cannot make us move anything outside it.
An answer that does not match is *discarded*; one that lacks an attribute we must check cannot be
verified and is discarded too — except ModalitiesInStudy, which the study's series settle.

A capped answer (0xFE00, or a known silent cap) at study level is split by bisecting the StudyDate
range; a capped series or instance list of one study cannot be split further: the listing is marked
incomplete with a note.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta

from app.dicom.matching import matches
from app.dicom.queries import key_level
from app.dicom.scu import DicomClient
from app.errors import PermanentDicomError

log = logging.getLogger("radcohort.retrievals")

# Open ends of a StudyDate range when bisecting (studies without a StudyDate cannot be reached by
# date-range splitting; they are only found when the unsplit answer is not capped).
MIN_DATE = date(1900, 1, 1)
MAX_DATE = date(2099, 12, 31)
FIND_BATCH = 16  # studies per IMAGE-level C-FIND with a UID list (a PACS probed to need no series key)
IMAGE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
SERIES_RETURN = ("StudyInstanceUID", "SeriesInstanceUID", "Modality")
STUDY_RETURN = ("StudyInstanceUID",)
LEVEL_OF = {"PATIENT": "STUDY", "STUDY": "STUDY", "SERIES": "SERIES", "IMAGE": "IMAGE"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    # answers dropped on our side, per level, and why
    discarded: dict[str, int] = field(default_factory=lambda: {"studies": 0, "series": 0, "instances": 0})
    not_honoured: set[str] = field(default_factory=set)  # keys the PACS answered against
    unverifiable: set[str] = field(default_factory=set)  # keys its answers did not carry
    duplicates: int = 0
    bad_rows: int = 0  # answers whose unique keys were missing or not UIDs: they cannot be named
    # a find with a list of study UIDs was refused, or answered nothing for studies that have
    # instances (a PACS that matches the list as one literal value): later listings ask per study
    uid_list_finds_unanswered: bool = False

    def report(self) -> dict:
        """What the retrieval report says about the listing."""
        return {"discarded": dict(self.discarded), "filtered_keys": sorted(self.not_honoured | self.unverifiable),
                "keys_not_honoured": sorted(self.not_honoured), "keys_not_returned": sorted(self.unverifiable),
                "duplicate_answers": self.duplicates, "answers_without_valid_uids": self.bad_rows}


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


def split_by_level(query: dict[str, str]) -> dict[str, dict[str, str]]:
    """The query's keys by the level they are sent at (patient keys go with the study level of the
    study root, PS3.4 C.6.2.1)."""
    out: dict[str, dict[str, str]] = {"STUDY": {}, "SERIES": {}, "IMAGE": {}}
    for k, v in query.items():
        out[LEVEL_OF[key_level(k)]][k] = v
    return out


def _uid(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(_UID.match(uid))


class _Walk:
    """One listing: holds the client, the per-level queries and the running Listing."""

    def __init__(self, client: DicomClient, query: dict[str, str], on_find: Callable[[Listing], None] | None,
                 image_by_study: bool = False, lanes: int = 1, uid_list_finds: bool = True):
        self.client, self.on_find = client, on_find
        self.by_level = split_by_level(query)
        self.out = Listing()
        self.lanes = max(1, lanes)
        # shared with the walks this one starts: once a UID-list find went unanswered, none is sent
        self.lists = {"ok": uid_list_finds}
        # a PACS probed to answer IMAGE level with the study's UID alone: one query per study instead of
        # one per series, when nothing is matched at series level
        self.image_by_study = image_by_study and not any(self.by_level["SERIES"].values())

    def find(self, level: str, q: dict[str, str], keys: tuple[str, ...]):
        res = self.client.find(level, q, return_keys=tuple(dict.fromkeys((*keys, *q))))
        self.out.finds += 1
        if self.on_find:
            self.on_find(self.out)
        return res

    def verify(self, level: str, ds, *, skip: tuple[str, ...] = ()) -> bool | None:
        """Does the answer match every matching value of its level? None: only `skip` keys (settled
        later) could not be verified."""
        deferred = False
        for k, wanted in self.by_level[level].items():
            if not wanted:
                continue
            got = matches(k, wanted, ds.get(k))
            if got is None and k in skip:
                deferred = True
            elif got is None:
                self.out.unverifiable.add(k)
                return False
            elif not got:
                self.out.not_honoured.add(k)
                return False
        return None if deferred else True

    def unique(self, results, key: str, above: dict[str, set[str]] | None = None) -> list:
        """Answers with a valid, unrepeated `key`, whose unique keys of the levels `above` are among
        the ones asked for (a PACS that ignores them answers with other studies' or series' rows)."""
        seen: dict[str, object] = {}
        for ds in results:
            uid = _uid(ds, key)
            uppers = {k: _uid(ds, k) for k in (above or {})}
            if not _valid_uid(uid) or not all(_valid_uid(v) for v in uppers.values()):
                self.out.bad_rows += 1
                continue
            if any(v not in (above or {})[k] for k, v in uppers.items()):
                self.out.discarded[{"StudyInstanceUID": "studies", "SeriesInstanceUID": "series",
                                    "SOPInstanceUID": "instances"}[key]] += 1
                continue
            if uid in seen:
                self.out.duplicates += 1
                continue
            seen[uid] = ds
        return list(seen.values())

    # ---------------------------------------------------------------- levels
    def studies(self, q: dict[str, str]) -> None:
        res = self.find("STUDY", q, STUDY_RETURN)
        if res.capped:
            lo, hi = date_bounds(q.get("StudyDate"))
            if lo < hi:
                self.out.splits += 1
                mid = lo + timedelta(days=(hi - lo).days // 2)
                log.info("C-FIND capped for %s..%s: splitting the date range", lo, hi)
                self.studies({**q, "StudyDate": f"{_s(lo)}-{_s(mid)}"})
                self.studies({**q, "StudyDate": f"{_s(mid + timedelta(days=1))}-{_s(hi)}"})
                return
            self.out.incomplete = True
            self.out.notes.append(f"more studies on {q.get('StudyDate') or 'the PACS'} than its result cap; "
                                  f"narrow the query or raise the PACS's limit")
        todo: list[tuple[str, str | None]] = []
        for ds in self.unique(res.results, "StudyInstanceUID"):
            ok = self.verify("STUDY", ds, skip=("ModalitiesInStudy",))
            if ok is False:
                self.out.discarded["studies"] += 1
                continue
            todo.append((_uid(ds, "StudyInstanceUID"), None if ok else self.by_level["STUDY"]["ModalitiesInStudy"]))
        # work in study order: studies whose instances one IMAGE-level find can list (a PACS probed to
        # answer it with the study key alone) go in UID-list batches, the others walk series first
        work: list[tuple[list[str], str | None, bool]] = []  # (studies, modalities, as one list)
        batch: list[str] = []
        for study, modalities in todo:
            if self.image_by_study and modalities is None and self.lists["ok"]:
                batch.append(study)
                if len(batch) == FIND_BATCH:
                    work.append((batch, None, True))
                    batch = []
            else:
                work.append(([study], modalities, False))
        if batch:
            work.append((batch, None, True))
        if self.lanes < 2 or len(work) < 2:
            parts = [self._walk(item) for item in work]
        else:
            # over the node's associations at once (the gate bounds them); each piece of work keeps
            # its own Listing, merged in study order so that the result does not depend on timing
            with ThreadPoolExecutor(min(self.lanes, len(work)), thread_name_prefix="listing") as pool:
                parts = list(pool.map(self._walk, work))
        for part in parts:
            self._merge(part)

    def _walk(self, item: tuple[list[str], str | None, bool]) -> Listing:
        studies, modalities, as_list = item
        sub = _Walk(self.client, {}, None)
        sub.by_level, sub.image_by_study, sub.lists = self.by_level, self.image_by_study, self.lists
        if as_list:
            sub.images_of_studies(studies)
        else:
            sub.series(studies[0], modalities)
        return sub.out

    def _merge(self, part: Listing) -> None:
        out = self.out
        for sop, item in part.items.items():
            if sop in out.items:
                out.duplicates += 1
            else:
                out.items[sop] = item
        out.finds += part.finds
        out.incomplete |= part.incomplete
        out.notes.extend(part.notes)
        for k, v in part.discarded.items():
            out.discarded[k] += v
        out.not_honoured |= part.not_honoured
        out.unverifiable |= part.unverifiable
        out.duplicates += part.duplicates
        out.bad_rows += part.bad_rows
        out.uid_list_finds_unanswered |= part.uid_list_finds_unanswered
        if self.on_find:
            self.on_find(out)

    def series(self, study: str, modalities: str | None) -> None:
        if self.image_by_study and modalities is None:
            return self.images(study, None)
        res = self.find("SERIES", {"StudyInstanceUID": study, **self.by_level["SERIES"]}, SERIES_RETURN)
        if res.capped:
            self.out.incomplete = True
            self.out.notes.append(f"study {study} has more series than the PACS's result cap")
        kept = []
        for ds in self.unique(res.results, "SeriesInstanceUID", {"StudyInstanceUID": {study}}):
            if not self.verify("SERIES", ds):
                self.out.discarded["series"] += 1
                continue
            kept.append(ds)
        if modalities is not None:
            # the PACS did not return ModalitiesInStudy: the study matches if one of its series does
            found = [matches("Modality", modalities, ds.get("Modality")) for ds in kept]
            if not any(found):
                if all(f is None for f in found):
                    self.out.unverifiable.add("ModalitiesInStudy")
                else:
                    self.out.not_honoured.add("ModalitiesInStudy")
                self.out.discarded["studies"] += 1
                return
        for ds in kept:
            self.images(study, _uid(ds, "SeriesInstanceUID"))

    def images_of_studies(self, studies: list[str]) -> None:
        """The instances of several studies with one IMAGE-level find (a UID list, PS3.4 C.2.2.2.2).
        A study the answer says nothing of is asked again on its own (a PACS that matches the list
        as one literal value answers nothing); a refused or capped answer falls back to one find
        per study; rows of studies not asked for are discarded."""
        if len(studies) == 1 or not self.lists["ok"]:
            for study in studies:
                self.images(study, None)
            return
        q = {"StudyInstanceUID": "\\".join(studies), **self.by_level["IMAGE"]}
        try:
            res = self.find("IMAGE", q, IMAGE_KEYS)
        except PermanentDicomError as exc:
            log.info("IMAGE-level C-FIND with a list of %d study UIDs refused (%s): one find per study",
                     len(studies), exc.message)
            self.out.uid_list_finds_unanswered = True  # pynetdicom's qrscp refuses them, for one
            self.lists["ok"] = False
            res = None
        if res is None or res.capped:
            for study in studies:
                self.images(study, None)
            return
        rows: dict[str, list] = {st: [] for st in studies}
        for ds in self.unique(res.results, "SOPInstanceUID", {"StudyInstanceUID": set(studies)}):
            rows[_uid(ds, "StudyInstanceUID")].append(ds)
        for study in studies:
            if not rows[study]:
                before = len(self.out.items)
                self.images(study, None)
                if len(self.out.items) > before:
                    self.out.uid_list_finds_unanswered = True
                    self.lists["ok"] = False
                continue
            for ds in rows[study]:
                self._keep(ds, study, None)

    def images(self, study: str, series: str | None) -> None:
        """The instances of one series (or, `series` None, of the whole study)."""
        q = {"StudyInstanceUID": study, **({"SeriesInstanceUID": series} if series else {}), **self.by_level["IMAGE"]}
        res = self.find("IMAGE", q, IMAGE_KEYS)
        if res.capped:
            self.out.incomplete = True
            self.out.notes.append(f"{'series ' + series if series else 'study ' + study} has more instances than "
                                  f"the PACS's result cap; raise the PACS's limit (e.g. Orthanc LimitFindInstances)")
        above = {"StudyInstanceUID": {study}, **({"SeriesInstanceUID": {series}} if series else {})}
        for ds in self.unique(res.results, "SOPInstanceUID", above):
            self._keep(ds, study, series)

    def _keep(self, ds, study: str, series: str | None) -> None:
        """One instance answer (valid and unrepeated) into the listing, if it matches the query."""
        sop = _uid(ds, "SOPInstanceUID")
        se = series or _uid(ds, "SeriesInstanceUID")
        if not _valid_uid(se):
            self.out.bad_rows += 1
        elif not self.verify("IMAGE", ds):
            self.out.discarded["instances"] += 1
        elif sop in self.out.items:
            self.out.duplicates += 1
        else:
            self.out.items[sop] = ExpectedInstance(sop, se, study, _uid(ds, "SOPClassUID"))


def list_expected(client: DicomClient, query: dict[str, str],
                  on_find: Callable[[Listing], None] | None = None, *, image_by_study: bool = False,
                  lanes: int = 1, uid_list_finds: bool = True) -> Listing:
    """Every instance matching `query` (validated keywords), as SOP/series/study UIDs, verified.
    `image_by_study`: the node was probed to answer IMAGE level without the series key. `lanes`:
    studies walked at once below the study level (each find is its own association: the client's
    gate keeps them within the node's limit). `uid_list_finds`: with `image_by_study`, list up to
    FIND_BATCH studies' instances with one find over a list of their UIDs (off for a node known to
    leave such finds unanswered)."""
    walk = _Walk(client, dict(query), on_find, image_by_study, lanes, uid_list_finds)
    walk.studies(walk.by_level["STUDY"])
    out = walk.out
    if out.bad_rows:
        out.incomplete = True
        out.notes.append(f"{out.bad_rows} C-FIND answer(s) without a valid Study/Series/SOP Instance UID could "
                         f"not be listed (the PACS's answers are malformed)")
    if out.not_honoured or out.unverifiable:
        log.info("listing: the PACS did not honour %s and did not return %s; %s answers discarded on our side",
                 sorted(out.not_honoured) or "-", sorted(out.unverifiable) or "-", out.discarded)
    return out
