"""Retrieval planning, pure: which retrieves bring exactly the missing instances, and how a refused
or paced one is cut smaller. No I/O, no database, no clock: the runner (app.retrievals.runner) asks,
the PACS-etiquette gate supplies the figures (instances per piece, whether windows need boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass

from app.dicom.queries import key_level
from app.retrievals.expected import ExpectedInstance

IMAGE_UNIT_MAX = 200  # SOP Instance UIDs per image-level retrieve identifier
MAX_UIDS_PER_RETRIEVE = 50  # studies (or series of one study) named in one retrieve
MAX_SOPS_PER_RETRIEVE = 2000  # instances one batched retrieve should bring, about
LEVEL_DEPTH = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}


@dataclass
class Unit:
    """One C-MOVE/C-GET: studies, series of one study, or instances of one series.

    Several studies (or several series of one study) go in one retrieve as a UID list (PS3.4
    C.4.2.2.1: list matching on the unique key of the retrieve level): one association and one
    PACS job instead of hundreds when studies are small.
    """

    level: str
    studies: list[str]
    series: list[str]
    sops: list[str]  # the expected instances it should bring

    @property
    def keys(self) -> dict[str, str]:
        k = {"StudyInstanceUID": "\\".join(self.studies)}
        if self.level in ("SERIES", "IMAGE"):
            k["SeriesInstanceUID"] = "\\".join(self.series)
        if self.level == "IMAGE":
            k["SOPInstanceUID"] = "\\".join(self.sops)
        return k

    @property
    def batched(self) -> bool:
        return len(self.studies) > 1 or len(self.series) > 1

    def describe(self) -> str:
        what = {"STUDY": ("study", self.studies), "SERIES": ("series", self.series),
                "IMAGE": ("instances of series", self.series)}[self.level]
        uids = what[1]
        return f"{what[0]} {uids[0]}" + (f" (+{len(uids) - 1})" if len(uids) > 1 else "")


def query_depth(query: dict[str, str]) -> str:
    """The deepest level a query's matching keys constrain (empty values do not constrain)."""
    depth = "STUDY"
    for k, v in query.items():
        lvl = key_level(k)
        if v and LEVEL_DEPTH[lvl] > LEVEL_DEPTH[depth]:
            depth = lvl
    return depth


def _batches(items: list[tuple[str, list[str]]], max_uids: int, max_sops: int):
    """Group (uid, sops) pairs into batches of at most max_uids uids and about max_sops instances."""
    batch: list[tuple[str, list[str]]] = []
    n = 0
    for uid, sops in items:
        if batch and (len(batch) >= max_uids or n + len(sops) > max_sops):
            yield batch
            batch, n = [], 0
        batch.append((uid, sops))
        n += len(sops)
    if batch:
        yield batch


def plan_units(missing: list[ExpectedInstance], expected: dict[str, ExpectedInstance], depth: str,
               max_uids: int = MAX_UIDS_PER_RETRIEVE) -> list[Unit]:
    """The fewest retrieves that bring exactly the missing instances.

    A whole study is moved only when the query constrains nothing below study level and every
    expected instance of it is missing; a whole series likewise; otherwise the missing instances
    of a series are named one by one (so a rerun fetches only what is missing). `max_uids`: studies
    or series named in one retrieve (1 for a PACS known to refuse UID lists).
    """
    counts: dict[tuple[str, str], int] = {}
    series_of: dict[str, set[str]] = {}
    for e in expected.values():
        key = (e.study_instance_uid, e.series_instance_uid)
        counts[key] = counts.get(key, 0) + 1
        series_of.setdefault(e.study_instance_uid, set()).add(e.series_instance_uid)
    miss: dict[str, dict[str, list[str]]] = {}
    for e in missing:
        miss.setdefault(e.study_instance_uid, {}).setdefault(e.series_instance_uid, []).append(e.sop_instance_uid)
    whole_studies: list[tuple[str, list[str]]] = []
    units: list[Unit] = []
    for study, series_map in miss.items():
        if depth == "STUDY" and all(len(series_map.get(se, [])) == counts[(study, se)] for se in series_of[study]):
            whole_studies.append((study, [u for sops in series_map.values() for u in sops]))
            continue
        whole_series = []
        for se, sops in series_map.items():
            if depth in ("STUDY", "SERIES") and len(sops) == counts[(study, se)]:
                whole_series.append((se, sops))
            else:
                for i in range(0, len(sops), IMAGE_UNIT_MAX):
                    units.append(Unit("IMAGE", [study], [se], sops[i:i + IMAGE_UNIT_MAX]))
        for b in _batches(whole_series, max_uids, MAX_SOPS_PER_RETRIEVE):
            units.append(Unit("SERIES", [study], [se for se, _ in b], [u for _, sops in b for u in sops]))
    for b in _batches(whole_studies, max_uids, MAX_SOPS_PER_RETRIEVE):
        units.append(Unit("STUDY", [st for st, _ in b], [], [u for _, sops in b for u in sops]))
    return units


def _split(unit: Unit, expected: dict[str, ExpectedInstance], only: set[str] | None = None) -> list[Unit]:
    """Smaller retrieves for a refused (or short-delivered) one: a batch -> one per UID; a single
    study -> one per series (some PACS refuse study-level moves). `only`: keep these instances."""
    sops = [u for u in unit.sops if only is None or u in only]
    if unit.level == "STUDY":
        by: dict[str, dict[str, list[str]]] = {}
        for sop in sops:
            e = expected[sop]
            by.setdefault(e.study_instance_uid, {}).setdefault(e.series_instance_uid, []).append(sop)
        if unit.batched:
            return [Unit("STUDY", [st], [], [u for v in m.values() for u in v]) for st, m in by.items()]
        return [Unit("SERIES", [st], [se], v) for st, m in by.items() for se, v in m.items()]
    if unit.level == "SERIES" and unit.batched:
        by_series: dict[str, list[str]] = {}
        for sop in sops:
            by_series.setdefault(expected[sop].series_instance_uid, []).append(sop)
        return [Unit("SERIES", unit.studies, [se], v) for se, v in by_series.items()]
    return []


def _one(level: str, study: str, series: str | None, sops: list[str]) -> Unit:
    return Unit(level, [study], [series] if series else [], sops)


def pieces(unit: Unit, expected: dict[str, ExpectedInstance], method: str, *, unit_max: int | None = None,
           split_batches: bool = False, study_refused: bool = False) -> list[Unit]:
    """Cut a unit at study/series boundaries (when transfer windows or a byte budget need them, and for
    WADO-RS, whose URLs name one study or series), and to `unit_max` instances (a rate limit's bucket).

    `split_batches`: a batch (several studies/series as one UID-list retrieve, much faster on small
    studies) is kept whole unless windows need boundaries to stop at or a byte bucket needs pieces to
    pace. `study_refused`: the PACS refuses study-level retrieves, ask per series."""
    size = unit_max
    if unit.level == "STUDY" and study_refused and not size:
        groups: dict[tuple[str, str], list[str]] = {}
        for sop in unit.sops:
            e = expected[sop]
            groups.setdefault((e.study_instance_uid, e.series_instance_uid), []).append(sop)
        return [_one("SERIES", st, se, sops) for (st, se), sops in groups.items()]
    split = unit.batched and split_batches
    if not split and not size and (method != "dicomweb" or unit.level == "IMAGE"):
        return [unit]
    groups = {}
    for sop in unit.sops:
        e = expected[sop]
        groups.setdefault((e.study_instance_uid, e.series_instance_uid), []).append(sop)
    if not size:
        if unit.level == "STUDY" and method != "dicomweb":
            by_study: dict[str, list[str]] = {}
            for (st, _se), sops in groups.items():
                by_study.setdefault(st, []).extend(sops)
            return [_one("STUDY", st, None, sops) for st, sops in by_study.items()]
        level = "IMAGE" if unit.level == "IMAGE" else "SERIES"
        return [_one(level, st, se, sops) for (st, se), sops in groups.items()]
    out = []
    for (st, se), sops in groups.items():
        for i in range(0, len(sops), size):
            out.append(_one("IMAGE", st, se, sops[i:i + size]))
    return out
