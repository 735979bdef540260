"""Cohort selection: class predicates in SQL over the covering label index, one row per patient
aggregated in SQL in a single pass (classes matched, usable images, a seeded pick, exclusion
counts), then quota sampling and a patient-level split in Python over patients, not instances.

Exclusion reasons (counts of instances): no_label (index rows without a body-part label),
incomplete_label (the known labels fit a class but a label it needs - view, laterality, sex or
age - is unknown, and no class takes the instance), not_an_image / unsupported_photometric,
conflicting_labels, patient_in_two_classes, duplicate_patient (other images of a selected
patient), file_missing (sampled but not on disk).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, and_, case, distinct, false, func, literal, not_, or_, select, union_all
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement

from app.db.models import Instance, Patient

LABEL_COLUMN = {"modality": "modality", "body_part": "label_body_part", "view": "label_view",
                "laterality": "label_laterality", "sex": "label_sex", "age_years": "label_age_years",
                "age_band": "label_age_band"}
IMAGE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
REASONS = ("no_label", "incomplete_label", "not_an_image", "unsupported_photometric", "conflicting_labels",
           "patient_in_two_classes", "duplicate_patient", "file_missing")
SPLITS = ("train", "val", "test")
_CHUNK = 5000
_P = 2147483629  # a prime below 2**31: every intermediate product fits a signed 64-bit integer
_A, _C = 1103515245 % _P, 69069


@dataclass
class CohortSpec:
    """What to build (the API's request body maps onto this)."""

    per_class: int | None = None
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    seed: int = 0
    balanced: bool = False  # every class gets the size of the smallest (capped by per_class)
    include_conflicts: bool = False
    match_name_birthdate: bool = False  # also treat same name + birth date as one patient
    check_files: bool = True  # sampled instances must exist under the store
    worklist: dict | None = None  # issue #17: only/all but a worklist's studies (app/worklists/restrict.py)


@dataclass
class BuildResult:
    classes: list[dict]
    excluded: dict[str, int]
    # instance_pk, patient_pk, class_name, split, file_path (None unless read for the file check), in
    # class order: the service writes UIDs and pseudonyms inside the database (app.cohorts.service)
    members: list[dict]
    timings: dict[str, float]


# Labels the engine always sets on a labelled row (never NULL), in index order after body part/view:
# when a class leaves one open but constrains a later index column, naming every value turns one
# long range scan into a few tight index seeks (a hand-made skip scan; same rows).
_ALWAYS_SET = ("laterality", "sex")


def class_predicate(where: dict, table=None, vocabulary: dict[str, list[str]] | None = None) -> ColumnElement:
    """SQL for one class: a conjunction over the label columns of `instances`."""
    t = table if table is not None else Instance.__table__
    conds = []
    for key, value in where.items():
        col = t.c[LABEL_COLUMN[key]]
        if key == "age_years":
            lo, hi = _age_bounds(value)
            if lo is not None:
                conds.append(col >= lo)
            if hi is not None:
                conds.append(col < hi)
        elif isinstance(value, list):
            conds.append(col.in_(value) if len(value) > 1 else col == value[0])
        else:
            conds.append(col == value)
    if vocabulary and "body_part" in where and "view" in where:
        later = ("sex", "age_years", "age_band")
        for i, key in enumerate(_ALWAYS_SET):
            if key not in where and any(k in where for k in _ALWAYS_SET[i + 1:] + later) and vocabulary.get(key):
                conds.append(t.c[LABEL_COLUMN[key]].in_(vocabulary[key]))
    return and_(*conds)


def _age_bounds(value) -> tuple[float | None, float | None]:
    """[lo, hi) years of an age_years predicate: whole years, inclusive (max 29 admits 29.99)."""
    rng = value if isinstance(value, dict) else {"min": value, "max": value}
    lo = float(rng["min"]) if rng.get("min") is not None else None
    hi = float(math.floor(float(rng["max"])) + 1) if rng.get("max") is not None else None
    return lo, hi


def classes_disjoint(classes: list[dict]) -> bool:
    """True when no instance can match two classes (some label's allowed values never overlap),
    so the selection can count rows instead of distinct instances."""
    def disjoint(a: dict, b: dict) -> bool:
        for key in a.keys() & b.keys():
            if key == "age_years":
                (alo, ahi), (blo, bhi) = _age_bounds(a[key]), _age_bounds(b[key])
                if (ahi is not None and blo is not None and ahi <= blo) or \
                        (bhi is not None and alo is not None and bhi <= alo):
                    return True
            else:
                va = set(a[key] if isinstance(a[key], list) else [a[key]])
                vb = set(b[key] if isinstance(b[key], list) else [b[key]])
                if not va & vb:
                    return True
        return False

    ws = [c["where"] for c in classes]
    return all(disjoint(ws[i], ws[j]) for i in range(len(ws)) for j in range(i + 1, len(ws)))


def candidate_query(classes: list[dict], spec: CohortSpec, vocabulary: dict | None = None):
    """One UNION ALL branch per class (each an index-only range scan), tagged with the class
    number, usability (an image, no label conflict unless allowed) and a seeded pick key."""
    t = Instance.__table__
    s1, s2 = spec.seed % _P, (spec.seed * 7919 + 17) % _P
    # a seeded pseudo-random order inside a patient: ((id + s1) * A + s2) * C mod P, with the id
    # in the low 32 bits so that MIN() of it names the chosen instance
    h = ((((t.c.id + literal(s1, BigInteger)) % _P) * _A % _P + s2) % _P) * _C % _P
    pick = h * literal(4294967296, BigInteger) + t.c.id
    image = t.c.photometric_interpretation.in_(IMAGE_PHOTOMETRIC)
    ok = image if spec.include_conflicts else and_(image, t.c.has_conflict.is_not(True))
    # -- issue #17 item 2: a worklist restricts the candidates (app/worklists/restrict.py) --
    from app.worklists.restrict import worklist_condition

    restriction = [w for w in (worklist_condition(t, spec),) if w is not None]
    # -- end issue #17 --
    branches = [
        select(t.c.id.label("id"), t.c.patient_pk.label("patient_pk"), literal(k).label("cls"),
               case((ok, 1), else_=0).label("ok"), t.c.photometric_interpretation.label("pi"),
               t.c.has_conflict.label("conflict"), pick.label("pick"))
        .where(class_predicate(c["where"], t, vocabulary), *restriction)
        for k, c in enumerate(classes)
    ]
    return branches[0] if len(branches) == 1 else union_all(*branches)


def selection_query(classes: list[dict], spec: CohortSpec, vocabulary: dict | None = None):
    """One row per patient with a candidate: (patient_pk, first class, last class, usable images,
    pick, not-an-image, unsupported photometric, conflicting) - a single pass over the index.

    Counts are of distinct instances; when the classes cannot overlap, plain row counts are the
    same thing and much cheaper."""
    c = candidate_query(classes, spec, vocabulary).subquery("c")
    count = (lambda e: func.count(e)) if classes_disjoint(classes) else (lambda e: func.count(distinct(e)))
    usable = c.c.ok == 1
    mono = c.c.pi.in_(IMAGE_PHOTOMETRIC)
    conflicting = and_(mono, c.c.conflict.is_(True)) if not spec.include_conflicts else literal(False)
    return (select(c.c.patient_pk,
                   func.min(case((usable, c.c.cls))), func.max(case((usable, c.c.cls))),
                   count(case((usable, c.c.id))), func.min(case((usable, c.c.pick))),
                   count(case((c.c.pi.is_(None), c.c.id))),
                   count(case((and_(c.c.pi.is_not(None), ~mono), c.c.id))),
                   count(case((conflicting, c.c.id))))
            .group_by(c.c.patient_pk))


# what the label engine writes when it cannot tell (app.labels.engine): None is NULL
_UNKNOWN = {"view": None, "laterality": "UNKNOWN", "sex": "UNKNOWN", "age_years": None, "age_band": None}


def incomplete_query(classes: list[dict], vocabulary: dict | None = None, restriction=None):
    """(class number, instance id) for the instances that would be in a class if one of the labels it
    needs were known, and are in no class as they are; None when no class needs such a label.

    One branch per class and per set of unknown labels, each a conjunction of equalities (an
    unknown is NULL or 'UNKNOWN'), so every branch is a tight seek of the label index; the few rows
    found are then checked against every class once, outside the branches (repeating that check
    in each branch made a 70 kB statement that took longer to compile than to run). `restriction`
    (a worklist's condition) narrows every branch, so the count is of the cohort's own candidates."""
    t = Instance.__table__
    label_cols = [t.c.modality, *[t.c[LABEL_COLUMN[k]] for k in LABEL_COLUMN if k != "modality"]]
    branches = []
    for k, c in enumerate(classes):
        where = c["where"]
        relaxable = [key for key in where if key in _UNKNOWN]
        for r in range(1, len(relaxable) + 1):
            for unknown in itertools.combinations(relaxable, r):
                # an unknown view stays in the predicate (as IS NULL) so that the index seek goes on past it
                w = {key: (_UNKNOWN[key] if key in unknown else v) for key, v in where.items()
                     if key not in unknown or key != "age_years"}
                conds = [class_predicate(w, t, vocabulary)]
                if restriction is not None:
                    conds.append(restriction)
                if "age_years" in unknown:
                    conds.append(t.c.label_age_years.is_(None))
                if "body_part" not in where:
                    conds.append(t.c.label_body_part.is_not(None))  # else it counts as no_label
                branches.append(select(literal(k).label("cls"), t.c.id, *label_cols).where(and_(*conds)))
    if not branches:
        return None
    # the branches of one class are disjoint (each fixes which labels are unknown): no dedup needed
    u = (union_all(*branches) if len(branches) > 1 else branches[0]).subquery("u")
    in_a_class = func.coalesce(or_(*[class_predicate(c["where"], u) for c in classes]), false())
    return select(u.c.cls, u.c.id).where(not_(in_a_class))


def _norm_name(name: str | None) -> str:
    s = unicodedata.normalize("NFKC", name or "").upper().replace("^", " ")
    return " ".join(s.split())


def _identities(session: Session, patient_pks: set[int]) -> dict[int, int]:
    """patient_pk -> identity root, joining patients with the same normalized name + birth date."""
    p = Patient.__table__
    parent = {pk: pk for pk in patient_pks}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_key: dict[tuple[str, str], int] = {}
    pks = sorted(patient_pks)
    for i in range(0, len(pks), _CHUNK):
        rows = session.execute(select(p.c.id, p.c.patient_name, p.c.patient_birth_date)
                               .where(p.c.id.in_(pks[i:i + _CHUNK]))).all()
        for pk, name, birth in rows:
            n = _norm_name(name)
            if not n or not birth:
                continue
            other = by_key.setdefault((n, birth), pk)
            a, b = find(pk), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {pk: find(pk) for pk in patient_pks}


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Whole-image counts per split; test and val rounded, train takes the rest."""
    out = {s: 0 for s in SPLITS if s in fractions}
    for s in ("test", "val"):
        if s in fractions:
            out[s] = int(round(n * fractions[s]))
    taken = sum(v for s, v in out.items() if s != "train")
    if taken > n:  # rounding up on tiny classes: trim val first, then test
        for s in ("val", "test"):
            while taken > n and out.get(s):
                out[s] -= 1
                taken -= 1
    if "train" in out:
        out["train"] = n - taken
    else:  # no train side: the remainder goes to the last side given
        last = [s for s in ("val", "test") if s in fractions][-1]
        out[last] += n - taken
    return out




def _compile(session: Session, stmt) -> tuple[str, Any]:
    compiled = stmt.compile(dialect=session.connection().dialect, compile_kwargs={"render_postcompile": True})
    params = compiled.construct_params()
    return str(compiled), (tuple(params[k] for k in compiled.positiontup) if compiled.positional else params)


def _raw_rows(session: Session, stmt) -> list[tuple]:
    """Execute on the DBAPI cursor and return plain tuples: the hot path returns ~10^5 rows and
    SQLAlchemy's result objects cost more than the query itself. Only integer/string columns."""
    return _run_compiled(session, *_compile(session, stmt))


def _run_compiled(session: Session, sql: str, args: Any) -> list[tuple]:
    cur = session.connection().connection.dbapi_connection.cursor()
    try:
        cur.execute(sql, args)
        return cur.fetchall()
    finally:
        cur.close()


_INCOMPLETE_SQL: dict[str, tuple[str, Any] | None] = {}


def _compiled_incomplete(session: Session, classes: list[dict], vocabulary: dict | None,
                         spec: CohortSpec) -> tuple[str, Any] | None:
    """incomplete_query compiled once per taxonomy, vocabulary, worklist restriction and backend:
    building and compiling its few dozen branches took longer (50 ms) than running them."""
    from app.worklists.restrict import worklist_condition

    w = getattr(spec, "worklist", None)
    w = w.model_dump() if hasattr(w, "model_dump") else w
    key = json.dumps([session.get_bind().dialect.name, classes, vocabulary, w], sort_keys=True, default=str)
    if key not in _INCOMPLETE_SQL:
        stmt = incomplete_query(classes, vocabulary, worklist_condition(Instance.__table__, spec))
        if len(_INCOMPLETE_SQL) >= 64:
            _INCOMPLETE_SQL.clear()
        _INCOMPLETE_SQL[key] = None if stmt is None else _compile(session, stmt)
    return _INCOMPLETE_SQL[key]


def rows_by_ids(session: Session, sql: str, ids: list[int]) -> list[tuple]:
    """Run `sql` (plain SQL whose WHERE ends in `{ids}`) for every id in `ids` on the DBAPI cursor:
    PostgreSQL gets one array parameter (`= ANY(%b)`); SQLite IN lists of _CHUNK literal placeholders
    (its bound-parameter limit). No SQLAlchemy compile: expanding 15,000 bound values cost 50 ms."""
    if not ids:
        return []
    if session.get_bind().dialect.name == "postgresql":
        return _run_compiled(session, sql.format(ids="= ANY(%b)"), (list(ids),))  # binary: no text array
    out: list[tuple] = []
    for k in range(0, len(ids), _CHUNK):
        chunk = list(ids[k:k + _CHUNK])
        out += _run_compiled(session, sql.format(ids=f"IN ({', '.join('?' * len(chunk))})"), tuple(chunk))
    return out


def _file_paths(session: Session, ids: list[int]) -> dict[int, str]:
    """instance id -> file_path (store-relative), for the file check of the sampled instances."""
    return dict(rows_by_ids(session, "SELECT id, file_path FROM instances WHERE id {ids}", ids))


def build(session: Session, taxonomy: dict, spec: CohortSpec, store_dir: Path | None = None,
          vocabulary: dict[str, list[str]] | None = None) -> BuildResult:
    """Select, de-duplicate, sample and split. Reads only; the caller saves the snapshot.

    `vocabulary` (the rule set's label vocabularies) lets the class predicates seek the index
    instead of scanning a range; results are the same without it. Members are instance and patient
    keys, class and split: nothing per member is read but the file path, for the file check."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    classes = taxonomy["classes"]
    names = [c["name"] for c in classes]
    excluded = dict.fromkeys(REASONS, 0)
    t = Instance.__table__
    from app.worklists.restrict import worklist_condition

    # the exclusion counts are of the cohort's candidates: within a worklist restriction, if any
    restriction = [w for w in (worklist_condition(t, spec),) if w is not None]
    excluded["no_label"] = session.scalar(select(func.count()).select_from(t)
                                          .where(t.c.label_body_part.is_(None), *restriction)) or 0
    incomplete: list[set[int]] = [set() for _ in classes]
    sql = _compiled_incomplete(session, classes, vocabulary, spec)
    if sql is not None:
        for k, iid in _run_compiled(session, *sql):
            incomplete[k].add(iid)
    excluded["incomplete_label"] = len(set().union(*incomplete))
    rows = []
    for ppk, cmin, cmax, n, pick, not_image, unsupported, conflicting in _raw_rows(
            session, selection_query(classes, spec, vocabulary)):
        excluded["not_an_image"] += not_image
        excluded["unsupported_photometric"] += unsupported
        excluded["conflicting_labels"] += conflicting
        if n:
            rows.append((ppk, cmin, cmax, n, pick))
    timings["query_s"] = time.perf_counter() - t0

    if spec.match_name_birthdate:
        # patients sharing a normalized name + birth date are one: union of classes, one pick
        # (the patient row of the picked instance is kept: the pseudonym is of its own PatientID)
        ident = _identities(session, {r[0] for r in rows})
        merged: dict[int, list] = {}
        for ppk, cmin, cmax, n, pick in rows:
            m = merged.get(ident[ppk])
            if m is None:
                merged[ident[ppk]] = [ident[ppk], cmin, cmax, n, pick, ppk]
            else:
                if pick < m[4]:
                    m[4], m[5] = pick, ppk
                m[1], m[2], m[3] = min(m[1], cmin), max(m[2], cmax), m[3] + n
        rows = [tuple(m) for m in merged.values()]
    else:
        rows = [(*r, r[0]) for r in rows]

    # pool entries: (patient or identity key, picked instance id, that instance's patient_pk)
    pools: list[list[tuple[int, int, int]]] = [[] for _ in classes]
    two_classes = duplicates = 0
    for key, cmin, cmax, n, pick, ppk in rows:
        if cmin != cmax:
            two_classes += n
            continue
        duplicates += n - 1
        pools[cmin].append((key, pick & 0xFFFFFFFF, ppk))
    excluded["patient_in_two_classes"] = two_classes
    excluded["duplicate_patient"] = duplicates
    timings["dedup_s"] = time.perf_counter() - t0 - timings["query_s"]

    available = [len(p) for p in pools]
    quota = spec.per_class
    if spec.balanced and available:
        quota = min(available) if quota is None else min(quota, min(available))

    members: list[dict] = []
    summary: list[dict] = []
    root = store_dir or Path(".")
    wants, positions, picked = [], [], []
    for k, pool in enumerate(pools):
        pool.sort()
        rng = random.Random(f"{spec.seed}/{names[k]}")  # per class: adding a class does not reshuffle others
        rng.shuffle(pool)
        wants.append(len(pool) if quota is None else min(quota, len(pool)))
        positions.append(0)
        picked.append([])
    # fetch what every class still needs in one round; refill only classes that lost files
    while True:
        batches = []
        for k, pool in enumerate(pools):
            need = wants[k] - len(picked[k])
            batch = pool[positions[k]:positions[k] + need] if need > 0 else []
            positions[k] += len(batch)
            batches.append(batch)
        if not any(batches):
            break
        # without the file check nothing per member is read here (the service writes UIDs in the database)
        paths = _file_paths(session, [iid for batch in batches for _, iid, _ in batch]) if spec.check_files else {}
        for k, batch in enumerate(batches):
            for _key, iid, ppk in batch:
                path = paths.get(iid)
                if spec.check_files and not (path and (root / path).is_file()):
                    excluded["file_missing"] += 1
                    continue
                picked[k].append((iid, ppk, path))
    for k in range(len(pools)):
        counts = split_counts(len(picked[k]), spec.split)
        sides = [s for s in ("test", "val", "train") if s in counts for _ in range(counts[s])]
        for (iid, ppk, path), side in zip(picked[k], sides):
            members.append({"instance_pk": iid, "patient_pk": ppk, "class_name": names[k], "split": side,
                            "file_path": path})
        summary.append({"name": names[k], "available": available[k], "selected": len(picked[k]),
                        "incomplete_label": len(incomplete[k]), **{s: counts.get(s, 0) for s in SPLITS}})
    timings["sample_s"] = time.perf_counter() - t0 - timings["query_s"] - timings["dedup_s"]
    timings["total_s"] = time.perf_counter() - t0
    return BuildResult(classes=summary, excluded=excluded, members=members, timings=timings)


def explain(session: Session, classes: list[dict], spec: CohortSpec | None = None,
            vocabulary: dict | None = None) -> list[str]:
    """The backend's query plan for the per-patient selection (for the benchmark and debugging)."""
    stmt = selection_query(classes, spec or CohortSpec(), vocabulary)
    compiled = stmt.compile(dialect=session.bind.dialect, compile_kwargs={"literal_binds": True})
    sql = str(compiled)
    if session.bind.dialect.name == "sqlite":
        sql = "EXPLAIN QUERY PLAN " + sql
    else:
        sql = "EXPLAIN " + sql.replace("%%", "%")  # literal SQL, no parameters: undo pyformat escaping
    cur = session.connection().connection.cursor()
    try:
        cur.execute(sql)
        return [" | ".join(str(c) for c in r) for r in cur.fetchall()]
    finally:
        cur.close()
