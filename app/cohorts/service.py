"""Cohorts as frozen snapshots: create (or preview), read, manifest, items for the training worker."""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app import audit
from app.cohorts.builder import BuildResult, CohortSpec, build, rows_by_ids
from app.cohorts.taxonomies import get_taxonomy
from app.db.models import Cohort, CohortMember
from app.errors import Conflict, InvalidInput, NotFound, RadcohortError
from app.labels.engine import RuleSet
from app.labels.service import get_rules
from app.privacy import patient_key

MANIFEST_COLUMNS = ("sop_instance_uid", "class", "split", "patient_key")


_MEMBER_COLUMNS = "cohort_id, instance_pk, sop_instance_uid, class_name, split, file_path, patient_key"


def _patient_keys(session: Session, patient_pks: set[int], pseudonym_key: bytes) -> dict[int, str]:
    """patient_pk -> HMAC pseudonym, for the members' patients only (one primary-key lookup each).

    The HMAC is computed here, never in the database: the deployment key does not leave the process
    (a statement parameter can end up in the server's logs)."""
    rows = rows_by_ids(session, "SELECT id, patient_id, issuer FROM patients WHERE id {ids}", sorted(patient_pks))
    return {pk: patient_key(pseudonym_key, pid, issuer) for pk, pid, issuer in rows}


def _write_members(session: Session, cohort_id: int, members: list[dict], keys: dict[int, str]) -> tuple[int, Counter]:
    """Insert the members with INSERT ... SELECT: each instance's UID and file path are looked up
    inside the database (no per-member UID or path is read into Python and sent back), in the
    members' order. Returns (rows inserted, ruleset_version -> members) from the same lookups.

    Only what the builder chose travels: instance id, class, split and pseudonym. PostgreSQL: four
    array parameters (unnest ... WITH ORDINALITY) in one statement; SQLite: a connection-local
    temporary table (dropped again; a rollback drops it too). An instance deleted since the selection
    is not found: the caller compares the count."""
    conn = session.connection()
    cur = conn.connection.dbapi_connection.cursor()
    ids = [m["instance_pk"] for m in members]
    try:
        if conn.dialect.name == "postgresql":
            # = ANY keeps the instance lookups on the primary key: joined to the unnest alone, the
            # planner merge-joined a full scan of the primary-key index (1,000,000 rows for 15,000).
            # Arrays go in binary (%b): as text, 15,000 pseudonyms cost 20 ms to format and 10 to parse
            cur.execute(f"""
                WITH m AS (
                    SELECT m.n, i.id, i.sop_instance_uid, m.class_name, m.split, i.file_path, m.patient_key,
                           i.ruleset_version
                    FROM unnest(%(ids)b::int[], %(cls)b::text[], %(split)b::text[], %(key)b::text[])
                         WITH ORDINALITY AS m(instance_pk, class_name, split, patient_key, n)
                    JOIN instances i ON i.id = m.instance_pk
                    WHERE i.id = ANY(%(ids)b::int[])),
                ins AS (
                    INSERT INTO cohort_members ({_MEMBER_COLUMNS})
                    SELECT %(cohort)s, id, sop_instance_uid, class_name, split, file_path, patient_key
                    FROM m ORDER BY n
                    RETURNING 1)
                SELECT (SELECT count(*) FROM ins), ruleset_version, count(*) FROM m GROUP BY ruleset_version""",
                        {"ids": ids, "cls": [m["class_name"] for m in members],
                         "split": [m["split"] for m in members],
                         "key": [keys[m["patient_pk"]] for m in members], "cohort": cohort_id})
            rows = cur.fetchall()
            inserted = rows[0][0] if rows else 0
            versions = Counter({v: n for _, v, n in rows})
        else:
            # one lookup per member (the UPDATE), then the insert and the version count read the
            # temporary table only: joining `instances` twice cost a second pass of page reads
            cur.execute("DROP TABLE IF EXISTS temp.cohort_pick")
            cur.execute("CREATE TEMP TABLE cohort_pick (seq INTEGER PRIMARY KEY, "
                        "instance_pk INTEGER NOT NULL, class_name TEXT NOT NULL, split TEXT NOT NULL, "
                        "patient_key TEXT NOT NULL, sop_instance_uid TEXT, file_path TEXT, ruleset_version TEXT)")
            cur.executemany("INSERT INTO temp.cohort_pick (seq, instance_pk, class_name, split, patient_key) "
                            "VALUES (?, ?, ?, ?, ?)",
                            [(n, m["instance_pk"], m["class_name"], m["split"], keys[m["patient_pk"]])
                             for n, m in enumerate(members)])
            cur.execute("UPDATE temp.cohort_pick SET (sop_instance_uid, file_path, ruleset_version) = "
                        "(SELECT i.sop_instance_uid, i.file_path, i.ruleset_version FROM instances i "
                        "WHERE i.id = cohort_pick.instance_pk)")
            cur.execute(f"INSERT INTO cohort_members ({_MEMBER_COLUMNS}) "
                        "SELECT ?, instance_pk, sop_instance_uid, class_name, split, file_path, patient_key "
                        "FROM temp.cohort_pick WHERE sop_instance_uid IS NOT NULL ORDER BY seq", (cohort_id,))
            inserted = cur.rowcount
            cur.execute("SELECT ruleset_version, count(*) FROM temp.cohort_pick "
                        "WHERE sop_instance_uid IS NOT NULL GROUP BY ruleset_version")
            versions = Counter(dict(cur.fetchall()))
            cur.execute("DROP TABLE temp.cohort_pick")
    finally:
        cur.close()
    return inserted, versions


def _left_the_index(gone: int, selected: int) -> str:
    return (f"{gone} of the {selected} selected instances left the index while the cohort was being saved: "
            "nothing was saved, create it again")


def _rounded(timings: dict) -> dict:
    return {k: round(v, 4) for k, v in timings.items()}


def _view(c: Cohort) -> dict:
    return {"id": c.id, "taxonomy": c.taxonomy_name, "ruleset_version": c.ruleset_version, "seed": c.seed,
            "size": c.size, "created_at": c.created_at, "preview": False,
            "classes": c.summary.get("classes", []), "excluded": c.excluded, "params": c.params,
            "warnings": c.summary.get("warnings", [])}


def cohort_warnings(classes: list[dict], excluded: dict, per_class: int | None) -> list[str]:
    """What a user should know before training on this cohort: empty classes, unfilled quotas, no test images."""
    out = []
    empty = [c["name"] for c in classes if not c.get("selected")]
    if empty:
        why = []
        if excluded.get("patient_in_two_classes"):
            why.append(f"{excluded['patient_in_two_classes']} instances of patients who fall in two classes were "
                       "excluded (overlapping classes?)")
        incomplete = sum(c.get("incomplete_label", 0) for c in classes if c["name"] in empty)
        if incomplete:
            why.append(f"{incomplete} images lack a label these classes need")
        out.append(f"no images for class(es) {', '.join(empty)}" + (f": {'; '.join(why)}" if why else ""))
    if per_class:
        short = [f"{c['name']} {c.get('selected', 0)}" for c in classes if 0 < c.get("selected", 0) < per_class]
        if short:
            out.append(f"quota of {per_class} per class not filled (all eligible images taken): {', '.join(short)}")
    untested = [c["name"] for c in classes if c.get("selected") and not c.get("test")]
    if untested:
        out.append(f"no test image for {', '.join(untested)} (too few images for the split): these classes "
                   "are not evaluated")
    return out


def create_cohort(session: Session, params: dict[str, Any], *, pseudonym_key: bytes,
                  store_dir: Path | None, actor: str = "cli", rules: RuleSet | None = None) -> dict:
    """Build a cohort from the request `params` (taxonomy name + CohortSpec fields).

    `preview` -> counts only, nothing written. Otherwise a Cohort row and its members (exact
    UIDs, split, HMAC patient key) are flushed and the creation is audited. `rules` (default:
    built-in) supplies the label vocabularies that let the selection seek the label index.
    """
    taxonomy = get_taxonomy(session, params["taxonomy"])
    spec = CohortSpec(**{k: params[k] for k in CohortSpec.__dataclass_fields__ if k in params})
    ruleset = rules or get_rules()
    result: BuildResult = build(session, taxonomy, spec, store_dir=store_dir, vocabulary=ruleset.vocabulary)
    warnings = cohort_warnings(result.classes, result.excluded, spec.per_class)
    if params.get("preview"):
        # a preview reads no members: it names the rule set in force (what a relabel brings the index to)
        return {"id": None, "taxonomy": taxonomy["name"], "preview": True, "seed": spec.seed,
                "ruleset_version": ruleset.version,
                "size": len(result.members), "classes": result.classes, "excluded": result.excluded,
                "params": params, "timings": _rounded(result.timings), "warnings": warnings}
    if not result.members:
        raise InvalidInput("no instance qualifies for any class, nothing saved; "
                           "preview the cohort to see the exclusion report")
    t_saved = time.perf_counter()
    keys = _patient_keys(session, {m["patient_pk"] for m in result.members}, pseudonym_key)
    t_keys = time.perf_counter()
    gone = sum(m["patient_pk"] not in keys for m in result.members)
    if gone:  # patients deleted since the selection (their instances went with them)
        raise Conflict(_left_the_index(gone, len(result.members)))
    frozen_taxonomy = {"name": taxonomy["name"], "description": taxonomy.get("description"),
                       "classes": taxonomy["classes"]}
    summary = {"classes": result.classes, "warnings": warnings}
    cohort = Cohort(taxonomy_name=taxonomy["name"], taxonomy=frozen_taxonomy, ruleset_version=None,
                    seed=spec.seed, params=params, size=len(result.members), excluded=result.excluded,
                    summary=summary)
    session.add(cohort)
    session.flush()  # the members reference the cohort row
    t_write = time.perf_counter()
    inserted, versions = _write_members(session, cohort.id, result.members, keys)
    t_written = time.perf_counter()
    if inserted != len(result.members):
        # an instance deleted since the selection (PostgreSQL reads committed rows per statement):
        # take back what was flushed, whatever the caller does next
        session.execute(delete(CohortMember).where(CohortMember.cohort_id == cohort.id))
        session.delete(cohort)
        session.flush()
        raise Conflict(_left_the_index(len(result.members) - inserted, len(result.members)))
    # the rule-set versions of the members, counted by the same lookups: set before the snapshot
    # is committed (it is never changed afterwards)
    ruleset_version = versions.most_common(1)[0][0] if versions else None
    cohort.ruleset_version = ruleset_version
    cohort.summary = {**summary, "ruleset_versions": {str(k): v for k, v in versions.items()}}
    audit.record(session, actor, "cohort.create", target=f"cohort:{cohort.id}", taxonomy=taxonomy["name"],
                 size=cohort.size, seed=spec.seed, ruleset_version=ruleset_version)
    session.flush()
    # save_s: all of the saving; keys_s (patient rows read, HMAC) and members_s (the INSERT) are parts of it
    timings = dict(result.timings, save_s=time.perf_counter() - t_saved, keys_s=t_keys - t_saved,
                   members_s=t_written - t_write)
    timings["total_s"] = timings["total_s"] + timings["save_s"]
    return {**_view(cohort), "timings": _rounded(timings)}


def _get(session: Session, cohort_id: int) -> Cohort:
    c = session.get(Cohort, cohort_id)
    if c is None:
        raise NotFound(f"cohort {cohort_id} not found")
    return c


def get_cohort(session: Session, cohort_id: int) -> dict:
    c = _get(session, cohort_id)
    return {**_view(c), "taxonomy_definition": c.taxonomy}


def list_cohorts(session: Session, limit: int = 100, offset: int = 0) -> tuple[int, list[dict]]:
    """(total, newest first page)."""
    total = session.scalar(select(func.count()).select_from(Cohort)) or 0
    q = select(Cohort).order_by(Cohort.id.desc()).limit(limit).offset(offset)
    return total, [_view(c) for c in session.scalars(q)]


def delete_cohort(session: Session, cohort_id: int, actor: str = "cli") -> None:
    """Delete a cohort and its members; Conflict while training jobs were run on it (their ids named)."""
    from app.db.models import TrainingJob

    _get(session, cohort_id)
    used = list(session.scalars(select(TrainingJob.id).where(TrainingJob.cohort_id == cohort_id)
                                .order_by(TrainingJob.id).limit(21)))
    if used:
        more = " and more" if len(used) > 20 else ""
        raise Conflict(f"cohort {cohort_id} was used by training job(s) {', '.join(map(str, used[:20]))}{more}: "
                       "it stays as the record of what they trained and tested on")
    # one statement for the members (no per-row ORM work), then the snapshot itself
    session.execute(delete(CohortMember).where(CohortMember.cohort_id == cohort_id))
    session.execute(delete(Cohort).where(Cohort.id == cohort_id))
    audit.record(session, actor, "cohort.delete", target=f"cohort:{cohort_id}")
    session.flush()


def _members(session: Session, cohort_id: int):
    _get(session, cohort_id)
    t = CohortMember.__table__
    q = (select(t.c.sop_instance_uid, t.c.class_name, t.c.split, t.c.patient_key, t.c.file_path)
         .where(t.c.cohort_id == cohort_id).order_by(t.c.id))
    return session.execute(q)


def cohort_items(session: Session, cohort_id: int) -> list[dict]:
    """The frozen member list for training: sop_instance_uid, class_name, split, file_path (store-relative)."""
    return [{"sop_instance_uid": uid, "class_name": cls, "split": split, "file_path": path}
            for uid, cls, split, _key, path in _members(session, cohort_id)]


def training_items(session: Session, cohort_id: int) -> list[dict]:
    """cohort_items plus patient_key (the pseudonym), to keep a patient's images together when the worker
    holds a validation split out of train."""
    return [{"sop_instance_uid": uid, "class_name": cls, "split": split, "file_path": path, "patient_key": key}
            for uid, cls, split, key, path in _members(session, cohort_id)]


def manifest_csv(session: Session, cohort_id: int) -> str:
    """CSV: sop_instance_uid, class, split, patient_key (pseudonymous; no PatientID/Name)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for uid, cls, split, key, _path in _members(session, cohort_id):
        w.writerow((uid, cls, split, key))
    return buf.getvalue()


def manifest_parquet(session: Session, cohort_id: int) -> bytes:
    """The manifest's columns as Parquet (zstd), with the snapshot's identity (cohort id, taxonomy,
    rule-set version, seed) in the file's key-value metadata. Needs the `parquet` extra (pyarrow)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RadcohortError("Parquet export needs pyarrow: pip install 'radcohort[parquet]' "
                             "(format=csv works without it)", status_code=501) from exc
    c = _get(session, cohort_id)
    cols: list[list[str]] = [[], [], [], []]
    for row in _members(session, cohort_id):
        for col, v in zip(cols, row[:4]):
            col.append(v)
    table = pa.table({name: pa.array(vals, pa.string()) for name, vals in zip(MANIFEST_COLUMNS, cols)})
    meta = {"radcohort.cohort_id": str(c.id), "radcohort.taxonomy": c.taxonomy_name,
            "radcohort.ruleset_version": c.ruleset_version or "", "radcohort.seed": str(c.seed)}
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
