"""Bulk, idempotent ingest of index records into Patient/Study/Series/Instance.

Core statements only (no ORM objects per row): one SELECT per level and batch for the keys
already present, one executemany INSERT ... ON CONFLICT DO NOTHING for the missing ones, then
one SELECT for their ids; instance rows (labels computed in the same loop) go in by one
INSERT ... ON CONFLICT DO NOTHING RETURNING, fed by COPY on PostgreSQL. Safe against concurrent
writers (other SCP processes) on SQLite and PostgreSQL. Callers commit (the SCP batcher, the
CLI); this module only executes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, String, select, tuple_
from sqlalchemy.orm import Session

from app.db.models import Instance, Patient, Series, Study

log = logging.getLogger("radcohort.index")

Labeler = Callable[[dict], dict]
_CHUNK = 500

_P_COLS = ("patient_id", "issuer", "patient_name", "patient_sex", "patient_birth_date",
           "patient_species_description", "patient_breed_description")
_ST_COLS = ("study_instance_uid", "study_date", "study_time", "accession_number", "study_description",
            "requested_procedure_description", "patient_age")
_SE_COLS = ("series_instance_uid", "modality", "body_part_examined", "series_description", "protocol_name",
            "laterality", "series_number", "performed_procedure_step_description")
_I_COLS = tuple(c.name for c in Instance.__table__.columns if c.name not in ("id", "series_pk", "study_pk",
                                                                              "patient_pk"))
_LABEL_COLS = {"label_body_part", "label_view", "label_laterality", "label_sex", "label_age_years",
               "label_age_band", "label_species", "label_sources", "label_conflicts", "has_conflict",
               "ruleset_version"}


@dataclass
class IngestResult:
    inserted: int = 0
    existing: int = 0
    label_errors: int = 0
    inserted_uids: list[str] = field(default_factory=list)
    existing_uids: list[str] = field(default_factory=list)
    # SOP Instance UID -> why it was not indexed: study_patient (a known study under another patient),
    # sop_study / sop_series (a known SOP Instance UID under another study or series)
    conflicts: dict[str, str] = field(default_factory=dict)


def _lengths(table) -> dict[str, int]:
    return {c.name: c.type.length for c in table.columns if isinstance(c.type, String) and c.type.length}


_LEN = {t.name: _lengths(t) for t in (Patient.__table__, Study.__table__, Series.__table__, Instance.__table__)}


def _clip(table_name: str, row: dict) -> dict:
    """Truncate text to the column width (PostgreSQL refuses longer values; SQLite would keep them)."""
    for k, n in _LEN[table_name].items():  # the sized text columns only: fewer than the row's keys
        v = row.get(k)
        if isinstance(v, str) and len(v) > n:
            row[k] = v[:n]
    return row


def _insert(session: Session, table):
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise RuntimeError(f"unsupported database dialect {name}")
    return insert(table)


def _chunks(seq: list, n: int = _CHUNK) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@dataclass
class IngestCache:
    """Patient/study/series ids known to be committed, reused across batches by one writer.

    ingest() stages what it resolved; the caller calls commit() after its transaction
    committed (or discard() after a rollback), so a cached id always names a committed row.
    """

    max_entries: int = 200_000
    patients: dict = field(default_factory=dict)  # (patient_id, issuer) -> id
    studies: dict = field(default_factory=dict)  # study uid -> (id, patient_pk)
    series: dict = field(default_factory=dict)  # series uid -> id
    _staged: list = field(default_factory=list)

    def commit(self) -> None:
        if sum(map(len, (self.patients, self.studies, self.series))) > self.max_entries:
            self.clear()
        for p, st, se in self._staged:
            self.patients.update(p)
            self.studies.update(st)
            self.series.update(se)
        self._staged.clear()

    def discard(self) -> None:
        self._staged.clear()

    def clear(self) -> None:
        self.patients.clear()
        self.studies.clear()
        self.series.clear()
        self._staged.clear()


def _ensure(session: Session, table, key_cols: tuple[str, ...], rows: dict[tuple, dict]) -> dict[tuple, int]:
    """Ids for `rows` (key tuple -> row), inserting the missing ones (first writer wins)."""
    cols = [table.c[k] for k in key_cols]
    key_expr = cols[0] if len(cols) == 1 else tuple_(*cols)

    def lookup(keys: list[tuple]) -> dict[tuple, int]:
        found: dict[tuple, int] = {}
        for chunk in _chunks(keys):
            vals = [k[0] for k in chunk] if len(cols) == 1 else chunk
            for r in session.execute(select(table.c.id, *cols).where(key_expr.in_(vals))):
                found[tuple(r[1:])] = r[0]
        return found

    if not rows:
        return {}
    ids = lookup(list(rows))
    missing = [rows[k] for k in rows if k not in ids]
    if missing:
        stmt = _insert(session, table).on_conflict_do_nothing(index_elements=list(key_cols))
        session.execute(stmt, [_clip(table.name, dict(r)) for r in missing])
        ids.update(lookup([k for k in rows if k not in ids]))
    return ids


_I_INS = _I_COLS + ("series_pk", "study_pk", "patient_pk")
_I_JSON = tuple(c.name for c in Instance.__table__.columns if isinstance(c.type, JSON))
_COPY_INS = ", ".join(_I_INS)
# the staging table outlives a transaction on a pooled connection: its name follows the column list,
# so a process whose models gained a column never COPYs into an older one
_TMP = "ingest_instances_" + hashlib.sha1(_COPY_INS.encode()).hexdigest()[:10]


def _pg_copy_instances(session: Session, rows: list[dict]) -> set[str]:
    """PostgreSQL: COPY the rows into a session-temporary table, then one INSERT ... SELECT ... ON CONFLICT
    DO NOTHING RETURNING (a multi-row INSERT through SQLAlchemy spent ~40 % of its time in psycopg
    parsing the 8,000-placeholder statement). Same semantics: the SOP Instance UIDs actually inserted."""
    cur = session.connection().connection.dbapi_connection.cursor()
    try:
        # kept for the connection's life (rows deleted at commit); emptied below for a second call in one transaction
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_TMP} ON COMMIT DELETE ROWS AS "
                    f"SELECT {_COPY_INS} FROM instances WITH NO DATA")
        json_idx = [i for i, c in enumerate(_I_INS) if c in _I_JSON]
        with cur.copy(f"COPY {_TMP} ({_COPY_INS}) FROM STDIN") as copy:
            for r in rows:
                vals = [r.get(c) for c in _I_INS]
                for i in json_idx:  # JSON text as SQLAlchemy's JSON type writes it (None -> JSON null)
                    vals[i] = json.dumps(vals[i])
                copy.write_row(vals)
        cur.execute(f"INSERT INTO instances ({_COPY_INS}) SELECT {_COPY_INS} FROM {_TMP} "
                    f"ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid")
        inserted = {u for (u,) in cur.fetchall()}
        cur.execute(f"DELETE FROM {_TMP}")
    finally:
        cur.close()
    return inserted


def ingest(session: Session, records: list[dict], labeler: Labeler | None = None,
           cache: IngestCache | None = None) -> IngestResult:
    """Upsert records (from extract_record); idempotent on SOPInstanceUID. Flushes, never commits.

    With `cache`, patient/study/series ids resolved by earlier committed batches are not looked up again.
    """
    result = IngestResult()
    by_sop: dict[str, dict] = {}
    for r in records:
        if not r.get("sop_instance_uid") or not r.get("study_instance_uid") or not r.get("series_instance_uid"):
            raise ValueError("record without SOP/Study/Series Instance UID")
        by_sop.setdefault(r["sop_instance_uid"], r)
    if not by_sop:
        return result
    # no pre-check of the SOP UIDs: INSERT ... ON CONFLICT DO NOTHING RETURNING tells which are new
    new = list(by_sop.values())
    cache = cache if cache is not None else IngestCache()

    pt, st, se, it = Patient.__table__, Study.__table__, Series.__table__, Instance.__table__

    def pkey(r: dict) -> tuple:
        return (r["patient_id"] or "", r.get("issuer") or "")

    pat_rows = {}
    for r in new:
        k = pkey(r)
        if k not in cache.patients and k not in pat_rows:
            row = {c: r.get(c) for c in _P_COLS}
            row["patient_id"], row["issuer"] = k
            pat_rows[k] = row
    pat_ids = _ensure(session, pt, ("patient_id", "issuer"), pat_rows)
    for r in new:
        k = pkey(r)
        if k not in pat_ids:
            pat_ids[k] = cache.patients[k]

    study_rows = {}
    for r in new:
        uid = r["study_instance_uid"]
        if uid not in cache.studies and (uid,) not in study_rows:
            row = {c: r.get(c) for c in _ST_COLS}
            row["patient_pk"] = pat_ids[pkey(r)]
            study_rows[(uid,)] = row
    # the study's owner as stored (a study seen before under another patient keeps its owner)
    studies: dict[str, tuple[int, int]] = {}
    if study_rows:
        _ensure(session, st, ("study_instance_uid",), study_rows)
        for chunk in _chunks([k[0] for k in study_rows]):
            for sid, uid, ppk in session.execute(select(st.c.id, st.c.study_instance_uid, st.c.patient_pk).where(
                    st.c.study_instance_uid.in_(chunk))):
                studies[uid] = (sid, ppk)
    for r in new:
        uid = r["study_instance_uid"]
        if uid not in studies:
            studies[uid] = cache.studies[uid]

    series_rows = {}
    for r in new:
        uid = r["series_instance_uid"]
        if uid not in cache.series and (uid,) not in series_rows:
            row = {c: r.get(c) for c in _SE_COLS}
            row["study_pk"] = studies[r["study_instance_uid"]][0]
            series_rows[(uid,)] = row
    series_ids = {k[0]: v for k, v in _ensure(session, se, ("series_instance_uid",), series_rows).items()}
    for r in new:
        uid = r["series_instance_uid"]
        if uid not in series_ids:
            series_ids[uid] = cache.series[uid]
    cache._staged.append((pat_ids, studies, series_ids))

    # a new instance of a known study that names another patient is not filed under the study's owner
    for r in new:
        if studies[r["study_instance_uid"]][1] != pat_ids[pkey(r)]:
            result.conflicts[r["sop_instance_uid"]] = "study_patient"
    if result.conflicts:
        new = [r for r in new if r["sop_instance_uid"] not in result.conflicts]

    now = datetime.now(timezone.utc)
    inst_rows = []
    for r in new:
        row = {c: r.get(c) for c in _I_COLS}
        row["series_pk"] = series_ids[r["series_instance_uid"]]
        row["study_pk"], row["patient_pk"] = studies[r["study_instance_uid"]]
        row["file_path"] = row["file_path"] or ""
        row["file_size"] = row["file_size"] or 0
        row["received_at"] = row["received_at"] or now
        row["has_conflict"] = False
        if labeler is not None:
            try:
                labels = labeler(r) or {}
                row.update({k: v for k, v in labels.items() if k in _LABEL_COLS})
            except Exception as exc:  # noqa: BLE001 - index the instance unlabeled, count it
                result.label_errors += 1
                log.warning("labeler failed for %s: %s", r["sop_instance_uid"], type(exc).__name__)
        row["has_conflict"] = bool(row.get("has_conflict"))
        inst_rows.append(_clip(it.name, row))
    if not inst_rows:  # all conflicts: no rows
        inserted = set()
    elif session.get_bind().dialect.name == "postgresql":
        inserted = _pg_copy_instances(session, inst_rows)
    else:
        stmt = _insert(session, it).on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(
            it.c.sop_instance_uid)
        inserted = set(session.scalars(stmt, inst_rows).all())
    result.inserted_uids = [r["sop_instance_uid"] for r in new if r["sop_instance_uid"] in inserted]
    # already indexed (or a concurrent writer won): the row exists, which is what idempotence means
    result.existing_uids = [r["sop_instance_uid"] for r in new if r["sop_instance_uid"] not in inserted]
    if result.existing_uids:  # a known SOP Instance UID must be the same instance, not one of another study
        want = {r["sop_instance_uid"]: (studies[r["study_instance_uid"]][0], series_ids[r["series_instance_uid"]])
                for r in new}
        for chunk in _chunks(result.existing_uids):
            for sop, study_pk, series_pk in session.execute(
                    select(it.c.sop_instance_uid, it.c.study_pk, it.c.series_pk).where(
                        it.c.sop_instance_uid.in_(chunk))):
                if study_pk != want[sop][0]:
                    result.conflicts[sop] = "sop_study"
                elif series_pk != want[sop][1]:
                    result.conflicts[sop] = "sop_series"
        result.existing_uids = [u for u in result.existing_uids if u not in result.conflicts]
    result.inserted, result.existing = len(result.inserted_uids), len(result.existing_uids)
    session.flush()
    return result


# ----------------------------------------------------------------------------- files on disk
@dataclass
class IndexDirResult:
    files: int = 0
    inserted: int = 0
    existing: int = 0
    unreadable: list[str] = field(default_factory=list)
    outside_store: int = 0
    # files the index refused (a known study under another patient, a known UID under another
    # study/series): left where they are, not indexed; SOP Instance UID -> reason
    conflicts: dict[str, str] = field(default_factory=dict)


def read_record(path: Path, relpath: str, source_node: str | None = None) -> dict:
    """Record for one Part 10 file (header only)."""
    from app.store import read_part10_header
    from app.index.extract import extract_record

    ds = read_part10_header(path)
    return extract_record(ds, file_path=relpath, file_size=path.stat().st_size,
                          transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
                          source_node=source_node)


def index_directory(ctx, directory: Path | None = None, labeler: Labeler | None = None, batch: int = 200,
                    progress: Callable[[int], None] | None = None) -> IndexDirResult:
    """Index the Part 10 files under `directory` (default: the store) in committed batches.

    Files are indexed where they are; `file_path` is relative to the store when they lie inside
    it, else absolute. Unreadable files are listed, not fatal.
    """
    store_root = ctx.settings.store_dir.resolve()
    root = Path(directory or store_root).resolve()
    res = IndexDirResult()
    pending: list[dict] = []
    cache = IngestCache()
    # one writer thread: the DB round trips of batch k overlap the header parsing of batch k+1
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
    inflight: Future | None = None

    def write(records: list[dict]) -> None:
        with ctx.sessions() as s:
            try:
                r = ingest(s, records, labeler=labeler, cache=cache)
                s.commit()
            except BaseException:
                cache.clear()
                raise
            cache.commit()
        res.inserted += r.inserted
        res.existing += r.existing
        for sop, why in r.conflicts.items():
            log.warning("not indexed %s: conflicts with the index (%s)", sop, why)
        res.conflicts.update(r.conflicts)
        if progress:
            progress(len(records))

    def flush() -> None:
        nonlocal inflight, pending
        if inflight is not None:
            inflight.result()  # one batch in flight at most; re-raises a write failure
            inflight = None
        if pending:
            inflight = pool.submit(write, pending)
            pending = []

    try:
        for p in sorted(root.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue  # temp files of writes in progress (.tmp-*, .incoming/)
            res.files += 1
            rel = str(p.relative_to(store_root)) if p.is_relative_to(store_root) else str(p)
            try:
                rec = read_record(p, rel)
            except Exception as exc:  # noqa: BLE001 - not DICOM or broken: report, keep going
                res.unreadable.append(str(p))
                log.warning("cannot index %s: %s", p, type(exc).__name__)
                continue
            if not rec.get("sop_instance_uid") or not rec.get("study_instance_uid") \
                    or not rec.get("series_instance_uid"):
                res.unreadable.append(str(p))
                continue
            pending.append(rec)
            if len(pending) >= batch:
                flush()
        flush()
        flush()  # wait for the last batch
    finally:
        pool.shutdown(wait=True)
    return res


def reindex(ctx, labeler: Labeler | None = None) -> IndexDirResult:
    """Index every file of the store that has no index row yet (after a crash or a DB loss)."""
    return index_directory(ctx, ctx.settings.store_dir, labeler=labeler)
